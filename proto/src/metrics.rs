//! Metric pieces the binaries share: label sets hashed once ([`Hashed`]), and the count of log
//! lines the process dropped ([`register_log_lines_dropped`]).
//!
//! Why hash once: a prometheus-client family finds a series by hashing its whole label set with
//! the standard library's SipHash, on every lookup; the proxies look up two to four families with
//! the same labels per connection or request (opened, closed, bytes each way; count and duration),
//! a dozen strings each time. [`Hashed`] computes one fast hash of the labels when they are built and
//! gives the family only that number to hash; equality still compares every label, so two label
//! sets share a series exactly when their labels are equal.
//!
//! The hash is foldhash's, seeded at random once per process: label values come from the control
//! plane and from certificates our CA signed, not from a client's free choice, and the seed keeps
//! even those from being lined up against the table.

use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::LazyLock;

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, LabelSetEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

static SEED: LazyLock<foldhash::fast::RandomState> = LazyLock::new(foldhash::fast::RandomState::default);

/// A label set and its hash, computed once; encodes exactly as the labels do.
#[derive(Debug, Clone)]
pub struct Hashed<L> {
    hash: u64,
    labels: L,
}

impl<L: Hash> Hashed<L> {
    /// Hashes `labels`.
    pub fn new(labels: L) -> Self {
        Hashed { hash: SEED.hash_one(&labels), labels }
    }
}

impl<L> Hashed<L> {
    /// The labels.
    pub fn labels(&self) -> &L {
        &self.labels
    }
}

impl<L> Hash for Hashed<L> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl<L: PartialEq> PartialEq for Hashed<L> {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.labels == other.labels
    }
}

impl<L: Eq> Eq for Hashed<L> {}

impl<L: EncodeLabelSet> EncodeLabelSet for Hashed<L> {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> Result<(), std::fmt::Error> {
        self.labels.encode(encoder)
    }
}

/// A counter whose value is kept elsewhere and read when the metrics are scraped.
#[derive(Debug)]
pub struct ReadCounter(pub fn() -> u64);

impl EncodeMetric for ReadCounter {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&(self.0)(), None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }
}

/// Registers `<component>_log_lines_dropped_total`: log lines this process dropped because its log
/// output could not keep up ([`crate::lifecycle::log_lines_dropped`]). Access-log lines are among
/// them, so a dashboard can tell a quiet log from a lossy one.
pub fn register_log_lines_dropped(registry: &mut Registry, component: &str) {
    registry.register(
        format!("{component}_log_lines_dropped"),
        "Log lines dropped because the log output (stderr) could not keep up",
        ReadCounter(crate::lifecycle::log_lines_dropped),
    );
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::registry::Registry;

    use super::*;

    #[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
    struct Labels {
        source: String,
        flags: &'static str,
    }

    fn labels(source: &str, flags: &'static str) -> Hashed<Labels> {
        Hashed::new(Labels { source: source.to_owned(), flags })
    }

    #[test]
    fn equal_labels_share_a_series_and_unequal_ones_do_not() {
        let family = Family::<Hashed<Labels>, Counter>::default();
        let mut registry = Registry::default();
        registry.register("connections", "test", family.clone());
        family.get_or_create(&labels("a", "-")).inc();
        // Built separately, equal: the same series.
        family.get_or_create(&labels("a", "-")).inc();
        family.get_or_create(&labels("a", "DENY")).inc();
        family.get_or_create(&labels("b", "-")).inc_by(5);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let mut series: Vec<&str> = text.lines().filter(|l| l.starts_with("connections_total{")).collect();
        series.sort_unstable();
        assert_eq!(
            series,
            [
                "connections_total{source=\"a\",flags=\"-\"} 2",
                "connections_total{source=\"a\",flags=\"DENY\"} 1",
                "connections_total{source=\"b\",flags=\"-\"} 5",
            ]
        );
    }

    #[test]
    fn a_read_counter_shows_the_value_at_scrape_time() {
        static VALUE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let mut registry = Registry::default();
        registry.register("lines_dropped", "test", ReadCounter(|| VALUE.load(std::sync::atomic::Ordering::Relaxed)));
        let scrape = |registry: &Registry| {
            let mut text = String::new();
            prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
            text.lines().filter(|l| !l.starts_with('#')).map(str::to_owned).collect::<Vec<_>>()
        };
        assert_eq!(scrape(&registry), ["lines_dropped_total 0"]);
        VALUE.store(17, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(scrape(&registry), ["lines_dropped_total 17"]);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("# TYPE lines_dropped counter"), "{text}");
    }

    #[test]
    fn equality_compares_the_labels_not_only_the_hash() {
        // Two label sets forced onto one hash are still two series.
        let (mut a, b) = (labels("a", "-"), labels("b", "-"));
        a.hash = b.hash;
        assert_ne!(a, b);
        assert_eq!(labels("a", "-"), labels("a", "-"));
    }
}
