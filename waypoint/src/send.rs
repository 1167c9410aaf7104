//! The sending half of one HTTP request: carries out a [`Plan`] over an [`Upstream`] — the
//! fault delay, the destination's limits, the mirror, then tries to endpoints with the rule's
//! per-try timeout, retries and overall timeout, ejecting endpoints that keep failing — and
//! shapes the answer the client gets.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use tracing::warn;

use crate::body::{Deadline, RequestBody};
use crate::destination::{Destinations, ServiceState, UpstreamTransport};
use crate::headers;
use crate::origination::Origination;
use crate::plan::{Answer, Outcome, Plan, text};
use crate::target::Endpoint;
use crate::upstream::{Body, BoxError};

/// Bodies buffered for retries and mirrors at most this large; larger ones stream, once (not
/// retried, not mirrored), as Envoy does past its buffer limit.
pub(crate) const MAX_REPLAY_BODY: usize = 1 << 20;

/// Where requests go: HTTP to endpoint pods (over HBONE in the waypoint; anything in tests).
pub(crate) trait Upstream: Sync {
    /// Sends `request` to the endpoint its URI names, as HTTP/2 when `http2`, in `tls` when set.
    fn send(
        &self,
        request: Request<Body>,
        http2: bool,
        tls: Option<&Arc<Origination>>,
    ) -> impl Future<Output = Result<Response<Body>, BoxError>> + Send;

    /// Sends a copy of a request (in `tls` when set); nobody waits for its answer.
    fn mirror(&self, request: Request<Body>, tls: Option<&Arc<Origination>>);
}

/// The client's side of an HTTP/1.1 upgrade it asked for. Unless the endpoint switched protocols
/// (and the two sides were joined), dropping it ends the client's connection cleanly: hyper hands
/// over the connection of a request that asked for an upgrade even when the answer was not 101,
/// and a connection dropped unflushed would lose that answer (a 403, say).
#[derive(Debug, Default)]
pub(crate) struct DownstreamUpgrade(Option<hyper::upgrade::OnUpgrade>);

impl DownstreamUpgrade {
    /// Takes the pending upgrade out of `request`.
    pub(crate) fn of<B>(request: &mut Request<B>) -> Self {
        DownstreamUpgrade(request.extensions_mut().remove::<hyper::upgrade::OnUpgrade>())
    }
}

impl Drop for DownstreamUpgrade {
    fn drop(&mut self) {
        if let Some(pending) = self.0.take() {
            tokio::spawn(async move {
                if let Ok(io) = pending.await {
                    let _ = tokio::io::AsyncWriteExt::shutdown(&mut TokioIo::new(io)).await;
                }
            });
        }
    }
}

/// Carries out `plan` with the request's `body`; the answer for the client and what happened.
pub(crate) async fn send(
    plan: Plan,
    body: Body,
    upstream: &impl Upstream,
    destinations: &Destinations,
    downstream_upgrade: &mut DownstreamUpgrade,
) -> (Response<Body>, Outcome) {
    let body = if plan.replays_body() {
        match RequestBody::buffer_up_to(body, MAX_REPLAY_BODY).await {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "request body failed while it was read");
                return Answer::text(StatusCode::BAD_REQUEST, "request body failed\n", "DPE", &plan.route).into_parts();
            }
        }
    } else {
        RequestBody::Stream(Some(body))
    };
    let limits = destinations.state(&plan.backend.key, plan.backend.policy());
    let deadline = plan.timeout.and_then(|t| Instant::now().checked_add(t));
    // A copy is sent as its own backend's DestinationRule says: in the TLS it originates, or not
    // at all when that TLS is refused.
    let mirror_transport = plan.mirror.as_ref().map(|m| match m.backend.tls_port() {
        Some(port) => destinations.state(&m.backend.key, m.backend.policy()).transport(port),
        None => UpstreamTransport::Plain,
    });
    let tried = try_endpoints(&plan, body, upstream, &limits, mirror_transport, downstream_upgrade);
    let (mut response, outcome) = match deadline {
        Some(d) => match tokio::time::timeout_at(d, tried).await {
            Ok(r) => r,
            Err(_) => {
                Answer::text(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout\n", "UT", &plan.route).into_parts()
            }
        },
        None => tried.await,
    };
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        headers::strip_hop_by_hop(response.headers_mut());
        // The route's timeout covers the body too.
        if let Some(d) = deadline {
            response = response.map(|b| Deadline::new(b, d).boxed());
        }
    }
    if let Some(m) = &plan.response_headers {
        headers::modify_headers(response.headers_mut(), m);
    }
    (response, outcome)
}

/// The fault delay, a place in the destination's limits, the mirror, then each try in turn
/// until one gives an answer that is not retried.
async fn try_endpoints(
    plan: &Plan,
    mut body: RequestBody,
    upstream: &impl Upstream,
    limits: &ServiceState,
    mirror_transport: Option<UpstreamTransport>,
    downstream_upgrade: &mut DownstreamUpgrade,
) -> (Response<Body>, Outcome) {
    // A delay counts against the request's timeout, as Envoy's does.
    if let Some(d) = plan.delay {
        tokio::time::sleep(d).await;
    }
    let tls = match plan.backend.tls_port().map(|port| limits.transport(port)) {
        None | Some(UpstreamTransport::Plain) => None,
        Some(UpstreamTransport::Tls(tls)) => Some(tls),
        // The reason was logged when the policy arrived; the client learns no configuration.
        Some(UpstreamTransport::Refused(_)) => {
            return Answer::text(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream connect error or disconnect/reset before headers. reset reason: TLS origination refused\n",
                "UF",
                &plan.route,
            )
            .into_parts();
        }
    };
    let Some(_slot) = limits.admit().await else {
        return Answer::text(
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream connect error or disconnect/reset before headers. reset reason: overflow\n",
            "UO",
            &plan.route,
        )
        .into_parts();
    };
    if let (Some(m), RequestBody::Buffered(b)) = (&plan.mirror, &body) {
        let tls = match mirror_transport {
            None | Some(UpstreamTransport::Plain) => Some(None),
            Some(UpstreamTransport::Tls(tls)) => Some(Some(tls)),
            Some(UpstreamTransport::Refused(_)) => None,
        };
        if let Some(tls) = tls
            && let Some(copy) = request_to(plan, &m.endpoint, Full::new(b.clone()).map_err(|e| match e {}).boxed())
        {
            upstream.mirror(copy, tls.as_ref());
        }
    }
    let http2 = plan.head.version == Version::HTTP_2;
    let policy = plan.backend.policy();
    let outlier = policy.and_then(|p| p.outlier_detection);
    let endpoints = &plan.backend.endpoints;
    let mut tried: Vec<String> = Vec::new();
    let mut last =
        Answer::text(StatusCode::SERVICE_UNAVAILABLE, "upstream unavailable\n", "UF", &plan.route).into_parts();
    let tries = plan.tries();
    for attempt in 0..tries {
        if attempt > 0
            && let Some(r) = &plan.retry
        {
            tokio::time::sleep(r.backoff).await;
        }
        // A retry goes to another endpoint when there is one.
        let Some(endpoint) = limits.pick(endpoints, policy, &tried) else { break };
        let workload = &endpoint.workload;
        tried.push(workload.uid.clone());
        let _in_flight = limits.start(&workload.uid);
        let Some(b) = body.take() else { break };
        let Some(mut request) = request_to(plan, endpoint, b) else { continue };
        *request.version_mut() = if http2 { Version::HTTP_2 } else { Version::HTTP_11 };
        let sent = upstream.send(request, http2, tls.as_ref());
        let result = match plan.per_try_timeout {
            Some(t) => tokio::time::timeout(t, sent).await.map_err(|_| ()),
            None => Ok(sent.await),
        };
        let delayed = plan.delay.is_some();
        let outcome = |status, flags: &'static str| Outcome {
            status,
            flags: if delayed && flags == "-" { "DI" } else { flags },
            endpoint: Some(workload.clone()),
            route: plan.route.clone(),
            attempts: attempt + 1,
        };
        match result {
            Ok(Ok(mut response)) => {
                let status = response.status();
                limits.record(&workload.uid, status.as_u16(), outlier.as_ref(), endpoints.len());
                if status == StatusCode::SWITCHING_PROTOCOLS {
                    let Some(down) = downstream_upgrade.0.take() else {
                        return (
                            text(StatusCode::BAD_GATEWAY, "unexpected 101 from upstream\n"),
                            outcome(StatusCode::BAD_GATEWAY, "UPE"),
                        );
                    };
                    let up = response.extensions_mut().remove::<hyper::upgrade::OnUpgrade>();
                    tokio::spawn(join_upgraded(down, up, workload.name.clone()));
                    let (mut head, _) = response.into_parts();
                    head.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                    return (Response::from_parts(head, empty_body()), outcome(status, "-"));
                }
                let retriable = plan.retry.as_ref().is_some_and(|r| r.on.contains(&status.as_u16()));
                if !retriable {
                    return (response, outcome(status, "-"));
                }
                // Kept in case no try gives a better answer; then the retries are exhausted.
                last = (response, outcome(status, "URX"));
            }
            Ok(Err(e)) => {
                limits.record(&workload.uid, 0, outlier.as_ref(), endpoints.len());
                warn!(endpoint = %workload.name, error = %proto::error_chain(&*e), attempt = attempt + 1,
                    "upstream request failed");
                last = (
                    text(StatusCode::SERVICE_UNAVAILABLE, "upstream connect error\n"),
                    outcome(StatusCode::SERVICE_UNAVAILABLE, "UF"),
                );
            }
            Err(()) => {
                limits.record(&workload.uid, 504, outlier.as_ref(), endpoints.len());
                last = (
                    text(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout\n"),
                    outcome(StatusCode::GATEWAY_TIMEOUT, "UT"),
                );
            }
        }
    }
    last
}

/// The plan's request addressed to `endpoint` (its address, or the DNS name of a ServiceEntry
/// endpoint), with `body`; `None` for an endpoint with neither.
fn request_to(plan: &Plan, endpoint: &Endpoint, body: Body) -> Option<Request<Body>> {
    let authority = match endpoint.address.or_else(|| endpoint.workload.primary_address()) {
        Some(ip) => SocketAddr::new(ip, endpoint.port).to_string(),
        None => format!("{}:{}", endpoint.workload.hostname.as_deref()?, endpoint.port),
    };
    let uri: Uri = format!("http://{authority}{}", plan.path_and_query).parse().ok()?;
    let mut request = Request::from_parts(plan.head.clone(), body);
    *request.uri_mut() = uri;
    Some(request)
}

/// An empty body.
fn empty_body() -> Body {
    http_body_util::Empty::new().map_err(|e| match e {}).boxed()
}

/// Joins the client's and the endpoint's upgraded connections until either side closes.
async fn join_upgraded(down: hyper::upgrade::OnUpgrade, up: Option<hyper::upgrade::OnUpgrade>, endpoint: String) {
    let Some(up) = up else {
        warn!(%endpoint, "endpoint answered 101 without an upgradable connection");
        return;
    };
    match tokio::try_join!(down, up) {
        Ok((down, up)) => {
            let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
            match tokio::io::copy_bidirectional(&mut down, &mut up).await {
                Ok((sent, received)) => tracing::debug!(%endpoint, sent, received, "upgraded connection closed"),
                Err(e) => tracing::debug!(%endpoint, error = %e, "upgraded connection ended with an error"),
            }
        }
        Err(e) => warn!(%endpoint, error = %e, "upgrade failed"),
    }
}

/// How long a mirrored request may take; then it is dropped.
pub(crate) const MIRROR_TIMEOUT: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;
    use proto::api::ambient::waypoint::v1::{self as pb, filter};
    use tokio::sync::Notify;

    use super::*;
    use crate::fixture::{self, KEY, SHADOW_KEY, Waypoint};
    use crate::plan::{Next, Plan};

    /// How the fake endpoint answers one request.
    enum Reply {
        Status(u16),
        /// The connection fails.
        Fail,
        /// Never answers.
        Hang,
        /// Answers once `Notify` fires.
        After(Arc<Notify>, u16),
    }

    /// A request as the fake endpoint got it.
    #[derive(Debug, Clone)]
    struct Got {
        to: String,
        path: String,
        body: Bytes,
        /// The SNI of the TLS it was to be sent in.
        tls: Option<String>,
    }

    /// An upstream that answers from a script (`200` once it runs out) and records what it got.
    #[derive(Default)]
    struct Fake {
        replies: Mutex<VecDeque<Reply>>,
        got: Mutex<Vec<Got>>,
        mirrored: Arc<Mutex<Vec<Got>>>,
    }

    impl Fake {
        fn replying(replies: impl IntoIterator<Item = Reply>) -> Fake {
            Fake { replies: Mutex::new(replies.into_iter().collect()), ..Default::default() }
        }

        fn got(&self) -> Vec<Got> {
            self.got.lock().unwrap().clone()
        }
    }

    async fn receive(request: Request<Body>, tls: Option<&Arc<Origination>>) -> Got {
        let tls = tls.map(|t| t.server_name().to_str().into_owned());
        let (parts, body) = request.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        Got { to: parts.uri.authority().unwrap().to_string(), path: parts.uri.path().to_owned(), body, tls }
    }

    impl Upstream for Fake {
        async fn send(
            &self,
            request: Request<Body>,
            _http2: bool,
            tls: Option<&Arc<Origination>>,
        ) -> Result<Response<Body>, BoxError> {
            let got = receive(request, tls).await;
            let to = got.to.clone();
            self.got.lock().unwrap().push(got);
            let reply = self.replies.lock().unwrap().pop_front().unwrap_or(Reply::Status(200));
            let status = match reply {
                Reply::Status(s) => s,
                Reply::Fail => return Err("connection refused".into()),
                Reply::Hang => std::future::pending().await,
                Reply::After(gate, s) => {
                    gate.notified().await;
                    s
                }
            };
            let mut response =
                Response::new(Full::new(Bytes::from(format!("{status} from {to}"))).map_err(|e| match e {}).boxed());
            *response.status_mut() = StatusCode::from_u16(status).unwrap();
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
            Ok(response)
        }

        fn mirror(&self, request: Request<Body>, tls: Option<&Arc<Origination>>) {
            let mirrored = self.mirrored.clone();
            let tls = tls.cloned();
            tokio::spawn(async move {
                let got = receive(request, tls.as_ref()).await;
                mirrored.lock().unwrap().push(got);
            });
        }
    }

    /// The plan for `method /` to `web` under one rule.
    fn plan(rule: pb::RouteRule, policy: Option<pb::DestinationPolicy>) -> Plan {
        let mut state = fixture::with_rules(fixture::state(), vec![rule]);
        if let Some(p) = policy {
            state.destination_policies.insert(KEY.into(), Arc::new(p));
        }
        match Waypoint::new().plan(&state, fixture::head("POST", "/", &[]), 1).next {
            Next::Send(p) => *p,
            Next::Answer(a) => panic!("answered {}", a.status),
        }
    }

    fn body(text: &'static str) -> Body {
        Full::new(Bytes::from_static(text.as_bytes())).map_err(|e| match e {}).boxed()
    }

    async fn run(plan: Plan, body: Body, fake: &Fake, destinations: &Destinations) -> (StatusCode, Outcome, Bytes) {
        let (response, outcome) = send(plan, body, fake, destinations, &mut DownstreamUpgrade::default()).await;
        let status = response.status();
        (status, outcome, response.into_body().collect().await.unwrap().to_bytes())
    }

    fn retrying(attempts: u32) -> pb::RouteRule {
        pb::RouteRule { retry: Some(pb::Retry { codes: vec![], attempts, backoff_ms: 0 }), ..fixture::rule() }
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_goes_to_the_other_endpoint_with_the_same_body() {
        let fake = Fake::replying([Reply::Status(503), Reply::Status(200)]);
        let start = Instant::now();
        let (status, outcome, answer) =
            run(plan(retrying(2), None), body("payload"), &fake, &Destinations::default()).await;
        let got = fake.got();
        assert_eq!((status, outcome.flags, outcome.attempts), (StatusCode::OK, "-", 2));
        assert_eq!(got.len(), 2);
        assert_ne!(got[0].to, got[1].to, "the retry went to the same endpoint");
        assert!(got.iter().all(|g| g.body == "payload" && g.path == "/"), "{got:?}");
        assert_eq!(answer, format!("200 from {}", got[1].to));
        assert_eq!(outcome.endpoint.unwrap().primary_address().unwrap().to_string() + ":8080", got[1].to);
        assert_eq!(start.elapsed(), Duration::from_millis(25), "one backoff, at its floor");

        // Endpoints picked at random: a retry still never goes back to the one that failed.
        let random = pb::DestinationPolicy {
            load_balancer: pb::destination_policy::LoadBalancer::Random as i32,
            ..Default::default()
        };
        let destinations = Destinations::default();
        for _ in 0..20 {
            let fake = Fake::replying([Reply::Status(503), Reply::Status(200)]);
            let (status, ..) = run(plan(retrying(2), Some(random.clone())), body(""), &fake, &destinations).await;
            let got = fake.got();
            assert_eq!((status, got.len()), (StatusCode::OK, 2));
            assert_ne!(got[0].to, got[1].to, "the retry went to the same endpoint");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_end_at_the_limit_and_only_the_statuses_named_are_retried() {
        let fake = Fake::replying([Reply::Status(503), Reply::Status(502), Reply::Status(503), Reply::Status(200)]);
        let (status, outcome, _) = run(plan(retrying(2), None), body(""), &fake, &Destinations::default()).await;
        assert_eq!((status, outcome.flags, outcome.attempts), (StatusCode::SERVICE_UNAVAILABLE, "URX", 3));
        assert_eq!(fake.got().len(), 3);

        let only_502 = pb::RouteRule {
            retry: Some(pb::Retry { codes: vec![502], attempts: 3, backoff_ms: 0 }),
            ..fixture::rule()
        };
        let fake = Fake::replying([Reply::Status(503)]);
        let (status, outcome, _) = run(plan(only_502, None), body(""), &fake, &Destinations::default()).await;
        assert_eq!((status, outcome.flags, outcome.attempts), (StatusCode::SERVICE_UNAVAILABLE, "-", 1));

        let fake = Fake::replying([Reply::Fail, Reply::Status(200)]);
        let (status, outcome, _) = run(plan(retrying(1), None), body(""), &fake, &Destinations::default()).await;
        assert_eq!((status, outcome.attempts), (StatusCode::OK, 2), "a failed connection is retried");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_connection_without_retries_is_503_uf() {
        let fake = Fake::replying([Reply::Fail]);
        let (status, outcome, _) = run(plan(fixture::rule(), None), body(""), &fake, &Destinations::default()).await;
        assert_eq!((status, outcome.flags, outcome.attempts), (StatusCode::SERVICE_UNAVAILABLE, "UF", 1));
        assert!(outcome.endpoint.is_some(), "the endpoint tried is reported");
    }

    #[tokio::test(start_paused = true)]
    async fn each_try_has_its_timeout_and_the_request_its_own() {
        let rule = pb::RouteRule { request_timeout_ms: 2_500, backend_request_timeout_ms: 1_000, ..retrying(5) };
        let fake = Fake::replying((0..10).map(|_| Reply::Hang));
        let start = Instant::now();
        let (status, outcome, _) = run(plan(rule, None), body("x"), &fake, &Destinations::default()).await;
        assert_eq!((status, outcome.flags), (StatusCode::GATEWAY_TIMEOUT, "UT"));
        assert_eq!(start.elapsed(), Duration::from_millis(2_500));
        // Tries at 0, 1.025 and 2.05 s.
        assert_eq!(fake.got().len(), 3);

        let per_try_only = pb::RouteRule { backend_request_timeout_ms: 1_000, ..retrying(1) };
        let fake = Fake::replying([Reply::Hang, Reply::Hang]);
        let (status, outcome, _) = run(plan(per_try_only, None), body("x"), &fake, &Destinations::default()).await;
        assert_eq!((status, outcome.flags, outcome.attempts), (StatusCode::GATEWAY_TIMEOUT, "UT", 2));
    }

    /// The tutorial's fault: a 10 s delay under a 5 s timeout never reaches the endpoint.
    #[tokio::test(start_paused = true)]
    async fn a_fault_delay_counts_against_the_timeout() {
        let delayed = |timeout_ms| pb::RouteRule {
            request_timeout_ms: timeout_ms,
            fault: Some(pb::Fault { delay: Some(pb::Delay { fixed_delay_ms: 10_000, percent: 100.0 }), abort: None }),
            ..fixture::rule()
        };
        let fake = Fake::default();
        let start = Instant::now();
        let (status, outcome, _) = run(plan(delayed(5_000), None), body(""), &fake, &Destinations::default()).await;
        assert_eq!(
            (status, outcome.flags, start.elapsed()),
            (StatusCode::GATEWAY_TIMEOUT, "UT", Duration::from_secs(5))
        );
        assert!(fake.got().is_empty());

        let start = Instant::now();
        let (status, outcome, _) = run(plan(delayed(0), None), body(""), &fake, &Destinations::default()).await;
        assert_eq!((status, outcome.flags, start.elapsed()), (StatusCode::OK, "DI", Duration::from_secs(10)));
        assert_eq!(fake.got().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_mirror_gets_a_copy_and_the_client_gets_the_real_answer() {
        let mirror = pb::Filter {
            kind: Some(filter::Kind::RequestMirror(pb::Mirror {
                backend: Some(pb::Backend { service: SHADOW_KEY.into(), port: 80, weight: 1, ..Default::default() }),
                percent: None,
            })),
        };
        let rule = pb::RouteRule { filters: vec![mirror], ..fixture::rule() };
        let fake = Fake::default();
        let (status, outcome, answer) = run(plan(rule, None), body("copy me"), &fake, &Destinations::default()).await;
        assert_eq!((status, outcome.attempts), (StatusCode::OK, 1));
        assert!(!answer.starts_with(b"200 from 10.0.0.3"), "the client got the mirror's answer");
        while fake.mirrored.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
        let mirrored = fake.mirrored.lock().unwrap().clone();
        assert_eq!(mirrored.len(), 1);
        assert_eq!((mirrored[0].to.as_str(), &mirrored[0].body[..]), ("10.0.0.3:8080", &b"copy me"[..]));
        assert_eq!(fake.got()[0].body, "copy me");
    }

    /// A DestinationRule's TLS goes with the request, and the mirror's rule with the copy; TLS
    /// that cannot be originated sends nothing: the request gets 503 (`UF`), the copy is dropped.
    #[tokio::test(start_paused = true)]
    async fn requests_and_copies_go_in_the_tls_their_rules_ask_for_or_not_at_all() {
        let mirror = pb::Filter {
            kind: Some(filter::Kind::RequestMirror(pb::Mirror {
                backend: Some(pb::Backend { service: SHADOW_KEY.into(), port: 80, weight: 1, ..Default::default() }),
                percent: None,
            })),
        };
        let rule = pb::RouteRule { filters: vec![mirror], ..fixture::rule() };
        let tls = |sni: &str, refusal: &str| pb::DestinationPolicy {
            hostname: "web.example".into(),
            tls: Some(pb::UpstreamTls {
                sni: sni.into(),
                insecure_skip_verify: true,
                refusal: refusal.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let plan_with = |web: pb::DestinationPolicy, shadow: pb::DestinationPolicy| {
            let mut state = fixture::with_rules(fixture::state(), vec![rule.clone()]);
            state.destination_policies.insert(KEY.into(), Arc::new(web));
            state.destination_policies.insert(SHADOW_KEY.into(), Arc::new(shadow));
            match Waypoint::new().plan(&state, fixture::head("POST", "/", &[]), 1).next {
                Next::Send(p) => *p,
                Next::Answer(a) => panic!("answered {}", a.status),
            }
        };
        let settle = || async {
            for _ in 0..20 {
                tokio::task::yield_now().await;
            }
        };

        let fake = Fake::default();
        let plan = plan_with(tls("web.example", ""), tls("shadow.example", ""));
        let (status, _, _) = run(plan, body("both"), &fake, &Destinations::default()).await;
        settle().await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(fake.got()[0].tls.as_deref(), Some("web.example"));
        assert_eq!(fake.mirrored.lock().unwrap()[0].tls.as_deref(), Some("shadow.example"));

        let fake = Fake::default();
        let plan = plan_with(tls("web.example", "DestinationRule a/b: no"), tls("shadow.example", ""));
        let (status, outcome, answer) = run(plan, body("refused"), &fake, &Destinations::default()).await;
        settle().await;
        assert_eq!((status, outcome.flags), (StatusCode::SERVICE_UNAVAILABLE, "UF"));
        assert!(String::from_utf8_lossy(&answer).contains("TLS origination refused"), "{answer:?}");
        assert!(!String::from_utf8_lossy(&answer).contains("DestinationRule"), "the client learns no configuration");
        assert!(fake.got().is_empty() && fake.mirrored.lock().unwrap().is_empty());

        let fake = Fake::default();
        let plan = plan_with(tls("web.example", ""), tls("shadow.example", "DestinationRule a/c: no"));
        let (status, _, _) = run(plan, body("no copy"), &fake, &Destinations::default()).await;
        settle().await;
        assert_eq!((status, fake.got().len()), (StatusCode::OK, 1));
        assert!(fake.mirrored.lock().unwrap().is_empty(), "a copy went out without the TLS its rule asks for");
    }

    /// The tutorial's circuit breaker: one connection, one waiting; a third request overflows.
    #[tokio::test(start_paused = true)]
    async fn beyond_the_limit_and_the_waiting_line_a_request_overflows() {
        let pool = pb::ConnectionPool {
            max_connections: 1,
            max_pending_requests: 1,
            max_requests_per_connection: 1,
            ..Default::default()
        };
        let policy = pb::DestinationPolicy { connection_pool: Some(pool), ..Default::default() };
        let gate = Arc::new(Notify::new());
        let fake = Fake::replying([Reply::After(gate.clone(), 200), Reply::Status(201)]);
        let destinations = Destinations::default();
        let request = || run(plan(fixture::rule(), Some(policy.clone())), body(""), &fake, &destinations);
        let (first, second, third, ()) = tokio::join!(request(), request(), request(), async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            gate.notify_one();
        });
        assert_eq!((third.0, third.1.flags, third.1.attempts), (StatusCode::SERVICE_UNAVAILABLE, "UO", 0));
        assert_eq!((first.0, second.0), (StatusCode::OK, StatusCode::CREATED), "the waiting one got the freed slot");
        assert_eq!(fake.got().len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_too_large_to_keep_is_sent_once_and_not_retried() {
        let big = Bytes::from(vec![7u8; MAX_REPLAY_BODY + 1]);
        let fake = Fake::replying([Reply::Status(503), Reply::Status(200)]);
        let whole = Full::new(big.clone()).map_err(|e| match e {}).boxed();
        let (status, outcome, _) = run(plan(retrying(2), None), whole, &fake, &Destinations::default()).await;
        assert_eq!((status, outcome.attempts), (StatusCode::SERVICE_UNAVAILABLE, 1));
        let got = fake.got();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].body, big, "the body arrived whole");
    }

    #[tokio::test(start_paused = true)]
    async fn the_answer_loses_hop_by_hop_headers_and_gets_the_rules_changes() {
        let set = pb::HeaderModifier {
            set: vec![pb::Header { name: "x-served-by".into(), value: "waypoint".into() }],
            ..Default::default()
        };
        let rule = pb::RouteRule {
            filters: vec![pb::Filter { kind: Some(filter::Kind::ResponseHeaderModifier(set)) }],
            ..fixture::rule()
        };
        let fake = Fake::default();
        let (response, _) =
            send(plan(rule, None), body(""), &fake, &Destinations::default(), &mut DownstreamUpgrade::default()).await;
        assert_eq!(response.headers()["x-served-by"], "waypoint");
        assert!(!response.headers().contains_key(header::CONNECTION));
    }
}
