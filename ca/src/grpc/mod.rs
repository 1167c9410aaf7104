//! The gRPC services of the control-plane port (15012, TLS): Istio's certificate service, our
//! CA admin service, and (wired in `lib.rs`) the delta xDS service.

pub mod tls;

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use proto::api::ambient::ca::v1 as admin_pb;
use proto::api::ambient::ca::v1::ca_admin_server::CaAdmin;
use proto::api::istio::v1::auth::istio_certificate_service_server::IstioCertificateService;
use proto::api::istio::v1::auth::{IstioCertificateRequest, IstioCertificateResponse};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::auth::{Authenticator, Caller, NodeAuthorizer};
use crate::authority::{AdminError, Authority, Material, Requester, RootState, SignError, csr};
use crate::metrics::CaMetrics;

pub use tls::PeerInfo;

/// The metadata key a node proxy uses to ask for a pod's identity.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// What the CA services share.
#[derive(Debug, Clone)]
pub struct CaService {
    /// Signing.
    pub authority: Arc<Authority>,
    /// Caller authentication.
    pub auth: Arc<Authenticator>,
    /// Who may have which identity.
    pub nodes: Arc<NodeAuthorizer>,
    /// Metrics.
    pub metrics: Arc<CaMetrics>,
    /// Certificates per caller.
    pub issue_limit: Arc<IssueLimiter>,
}

/// Authenticates the caller of a request from its `authorization` header and TLS peer.
pub async fn authenticate<T>(auth: &Authenticator, request: &Request<T>) -> Result<Caller, crate::auth::AuthError> {
    let header = request.metadata().get("authorization").map(|v| v.as_bytes().to_vec());
    let peer = request.extensions().get::<PeerInfo>();
    auth.authenticate(header.as_deref(), peer.and_then(|p| p.identity.as_ref())).await
}

fn peer_addr<T>(request: &Request<T>) -> String {
    request.extensions().get::<PeerInfo>().map_or_else(|| "unknown".into(), |p| p.addr.to_string())
}

/// The `ImpersonatedIdentity` a request's metadata asks for, if any (it must be a string).
#[allow(clippy::result_large_err)]
pub fn impersonated_identity(metadata: Option<&prost_types::Struct>) -> Result<Option<&str>, Status> {
    use prost_types::value::Kind;
    let Some(value) = metadata.and_then(|m| m.fields.get(IMPERSONATED_IDENTITY)) else { return Ok(None) };
    match &value.kind {
        Some(Kind::StringValue(s)) => Ok(Some(s.as_str())),
        _ => Err(Status::invalid_argument(format!("metadata {IMPERSONATED_IDENTITY} must be a string"))),
    }
}

fn now_unix() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// Certificates per caller: a token bucket per (identity, bound node), so one credential cannot
/// grow the issuance log (or the CA's CPU bill) without bound.
#[derive(Debug)]
pub struct IssueLimiter {
    limiter: governor::DefaultKeyedRateLimiter<(String, Option<String>)>,
}

impl IssueLimiter {
    /// `per_second` sustained, `burst` at once (both at least 1).
    pub fn new(per_second: u32, burst: u32) -> Self {
        let nz = |n: u32| std::num::NonZeroU32::new(n.max(1)).unwrap_or(std::num::NonZeroU32::MIN);
        let quota = governor::Quota::per_second(nz(per_second)).allow_burst(nz(burst));
        IssueLimiter { limiter: governor::RateLimiter::dashmap(quota) }
    }

    /// Whether `caller` may have one more certificate now.
    pub fn allow(&self, caller: &Caller) -> bool {
        // Forget callers whose buckets are full again, so the map stays as small as the set of
        // recent callers.
        if self.limiter.len() > 4096 {
            self.limiter.retain_recent();
        }
        self.limiter.check_key(&(caller.identity.to_string(), caller.node.clone())).is_ok()
    }
}

impl CaService {
    fn refuse(&self, reason: &str, status: Status) -> Status {
        self.metrics.refuse(reason);
        status
    }

    async fn create(&self, request: Request<IstioCertificateRequest>) -> Result<IstioCertificateResponse, Status> {
        self.metrics.requests.inc();
        let peer = peer_addr(&request);
        let caller = match authenticate(&self.auth, &request).await {
            Ok(c) => c,
            Err(e) => {
                warn!(%peer, reason = proto::error_chain(&e), "certificate request refused: authentication failed");
                return Err(self.refuse(e.reason(), Status::unauthenticated("request authentication failed")));
            }
        };
        if !self.issue_limit.allow(&caller) {
            warn!(%peer, caller = %caller.identity, node = caller.node.as_deref().unwrap_or(""),
                "certificate request refused: rate limited");
            return Err(
                self.refuse("rate_limited", Status::resource_exhausted("too many certificate requests; retry later"))
            );
        }
        let started = Instant::now();
        let request = request.into_inner();
        let checked = csr::check(&request.csr).map_err(|e| {
            let why = proto::error_chain(&e);
            warn!(%peer, caller = %caller.identity, reason = %why, "certificate request refused: bad CSR");
            self.refuse(e.reason(), Status::invalid_argument(why))
        })?;
        let impersonated =
            impersonated_identity(request.metadata.as_ref()).map_err(|s| self.refuse("bad_metadata", s))?;
        let node = match self.nodes.authorize(&caller, &checked.identity, impersonated) {
            Ok(node) => node,
            Err(crate::auth::Denied::NotReady) => {
                info!(%peer, caller = %caller.identity, "certificate request deferred: pods not loaded yet");
                return Err(self.refuse("not_ready", Status::unavailable("control plane is starting; retry shortly")));
            }
            Err(denied) => {
                warn!(%peer, caller = %caller.identity, requested = %checked.identity, reason = %denied,
                    "certificate request refused: not authorized");
                return Err(self.refuse(denied.reason(), Status::unauthenticated("request authorization failed")));
            }
        };
        let ttl = self.authority.lifetime(request.validity_duration).map_err(|e| {
            warn!(%peer, caller = %caller.identity, reason = %e, "certificate request refused: lifetime");
            self.refuse("ttl", Status::invalid_argument(e.to_string()))
        })?;
        let by = Requester { caller: caller.identity.to_string(), node };
        let issued = self.authority.issue(&checked, ttl, by).await.map_err(|e| {
            tracing::error!(caller = %caller.identity, error = proto::error_chain(&e), "signing failed");
            match e {
                SignError::Log(_) => self.refuse("log_unavailable", Status::unavailable(e.to_string())),
                _ => self.refuse("internal", Status::internal("signing failed")),
            }
        })?;
        self.metrics.signing.observe(started.elapsed().as_secs_f64());
        self.metrics.issued.inc();
        info!(
            identity = %issued.record.identity,
            serial = %issued.record.serial,
            caller = %caller.identity,
            node = issued.record.node.as_deref().unwrap_or(""),
            not_after = issued.record.not_after,
            "issued certificate"
        );
        Ok(IstioCertificateResponse { cert_chain: issued.chain })
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        self.create(request).await.map(Response::new)
    }
}

/// The admin service.
#[derive(Debug, Clone)]
pub struct AdminService(pub CaService);

impl AdminService {
    async fn admin<T>(&self, request: &Request<T>, what: &str) -> Result<Caller, Status> {
        let peer = peer_addr(request);
        let caller = authenticate(&self.0.auth, request).await.map_err(|e| {
            warn!(%peer, reason = proto::error_chain(&e), what, "admin call refused: authentication failed");
            Status::unauthenticated("request authentication failed")
        })?;
        if !self.0.auth.is_admin(&caller) {
            warn!(%peer, caller = %caller.identity, what, "admin call refused: not an admin identity");
            return Err(Status::permission_denied(format!("{} is not an admin identity", caller.identity)));
        }
        Ok(caller)
    }

    fn status(&self, m: &Material) -> admin_pb::CaStatus {
        let now = now_unix();
        let log = self.0.authority.log();
        let roots = m
            .roots
            .iter()
            .map(|r| admin_pb::RootInfo {
                fingerprint_sha256: r.info.fingerprint.clone(),
                subject: r.info.subject.clone(),
                not_after_unix: r.info.not_after,
                state: match r.state {
                    RootState::Pending => admin_pb::RootState::Pending,
                    RootState::Active => admin_pb::RootState::Active,
                    RootState::Retiring => admin_pb::RootState::Retiring,
                } as i32,
                unexpired_issued: log.unexpired_under(&r.info.fingerprint, now).0,
            })
            .collect();
        admin_pb::CaStatus {
            trust_domain: self.0.authority.config().trust_domain.clone(),
            plugged_in: m.plugged_in.is_some(),
            roots,
            signer_fingerprint_sha256: m.signer.info.fingerprint.clone(),
            signer_subject: m.signer.info.subject.clone(),
            signer_not_after_unix: m.signer.info.not_after,
            bundle: Some(admin_pb::TrustBundle {
                trust_domain: self.0.authority.config().trust_domain.clone(),
                roots_pem: m.bundle_pem(),
            }),
        }
    }

    fn rotated(
        &self,
        caller: &Caller,
        what: &str,
        result: Result<Arc<Material>, AdminError>,
    ) -> Result<Response<admin_pb::CaStatus>, Status> {
        match result {
            Ok(m) => {
                info!(caller = %caller.identity, what, signer = %m.signer.info.fingerprint, "admin: rotation step done");
                self.0.metrics.signer_expiry.set(m.signer.info.not_after);
                Ok(Response::new(self.status(&m)))
            }
            Err(e) => {
                warn!(caller = %caller.identity, what, reason = proto::error_chain(&e), "admin: rotation step refused");
                Err(match e {
                    AdminError::PluggedIn(_) | AdminError::WrongStep(_) | AdminError::RootInUse { .. } => {
                        Status::failed_precondition(e.to_string())
                    }
                    AdminError::Setup(_) => Status::internal(proto::error_chain(&e)),
                })
            }
        }
    }
}

#[tonic::async_trait]
impl CaAdmin for AdminService {
    async fn get_status(
        &self,
        request: Request<admin_pb::GetStatusRequest>,
    ) -> Result<Response<admin_pb::CaStatus>, Status> {
        self.admin(&request, "status").await?;
        Ok(Response::new(self.status(&self.0.authority.material())))
    }

    async fn rotate_intermediate(
        &self,
        request: Request<admin_pb::RotateIntermediateRequest>,
    ) -> Result<Response<admin_pb::CaStatus>, Status> {
        let caller = self.admin(&request, "rotate intermediate").await?;
        self.rotated(&caller, "rotate intermediate", self.0.authority.rotate_intermediate().await)
    }

    async fn rotate_root(
        &self,
        request: Request<admin_pb::RotateRootRequest>,
    ) -> Result<Response<admin_pb::CaStatus>, Status> {
        use admin_pb::rotate_root_request::Phase;
        let caller = self.admin(&request, "rotate root").await?;
        let req = request.into_inner();
        match Phase::try_from(req.phase).unwrap_or(Phase::Unspecified) {
            Phase::Prepare => self.rotated(&caller, "root: prepare", self.0.authority.prepare_root().await),
            Phase::Activate => self.rotated(&caller, "root: activate", self.0.authority.activate_root().await),
            Phase::Retire => self.rotated(&caller, "root: retire", self.0.authority.retire_root(req.force).await),
            Phase::Unspecified => Err(Status::invalid_argument("phase must be PREPARE, ACTIVATE or RETIRE")),
        }
    }

    async fn list_certificates(
        &self,
        request: Request<admin_pb::ListCertificatesRequest>,
    ) -> Result<Response<admin_pb::ListCertificatesResponse>, Status> {
        self.admin(&request, "list certificates").await?;
        let req = request.into_inner();
        let now = now_unix();
        let certificates = self
            .0
            .authority
            .log()
            .records(now)
            .into_iter()
            .filter(|r| req.include_expired || r.not_after > now)
            .filter(|r| req.identity.is_empty() || r.identity == req.identity)
            .map(|r| admin_pb::IssuedCertificate {
                serial_hex: r.serial,
                identity: r.identity,
                node: r.node.unwrap_or_default(),
                requested_by: r.requested_by,
                not_before_unix: r.not_before,
                not_after_unix: r.not_after,
                root_fingerprint_sha256: r.root,
            })
            .collect();
        Ok(Response::new(admin_pb::ListCertificatesResponse { certificates }))
    }
}
