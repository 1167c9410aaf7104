//! Who is calling the control plane, and what they may ask for.
//!
//! Authentication, in order:
//! 1. `authorization: Bearer <JWT>`: a Kubernetes service-account token, checked by a TokenReview
//!    against the API server (in a cluster) or locally against a configured issuer and JWKS
//!    (without one). The audience must be one of ours. The token's bound pod / node, if any,
//!    become the caller's node binding.
//! 2. A client certificate issued by this CA (verified in the TLS handshake): its SPIFFE ID.
//!
//! Authorization of a certificate request ([`NodeAuthorizer`]): a caller gets its own identity;
//! a node proxy (a configured node account) may ask for a pod's identity with
//! `ImpersonatedIdentity`, only for a pod scheduled on the node its token is bound to.
//!
//! Refusals carry an internal reason for the log; callers only learn that they were refused.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use proto::SpiffeId;
use serde::Deserialize;

use crate::objects::Objects;

/// The audience Istio's proxies request for CA tokens.
pub use proto::control::CA_AUDIENCE as DEFAULT_AUDIENCE;

/// Local JWT validation settings.
#[derive(Clone)]
pub struct JwtIssuer {
    /// Required `iss`.
    pub issuer: String,
    /// Verification keys.
    pub jwks: JwkSet,
}

impl fmt::Debug for JwtIssuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtIssuer").field("issuer", &self.issuer).field("keys", &self.jwks.keys.len()).finish()
    }
}

/// How tokens are checked.
#[derive(Clone)]
pub enum TokenCheck {
    /// Tokens are not accepted (client certificates only).
    Disabled,
    /// Locally, against an issuer and its keys.
    Local(JwtIssuer),
    /// By TokenReview through the API server.
    TokenReview(kube::Client),
}

impl fmt::Debug for TokenCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenCheck::Disabled => f.write_str("Disabled"),
            TokenCheck::Local(j) => j.fmt(f),
            TokenCheck::TokenReview(_) => f.write_str("TokenReview"),
        }
    }
}

/// Authentication and authorization settings.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// Trust domain of the identities callers get.
    pub trust_domain: String,
    /// Accepted token audiences.
    pub audiences: Vec<String>,
    /// Token checking.
    pub tokens: TokenCheck,
    /// Identities allowed to ask for the pods on their node (`ImpersonatedIdentity`).
    pub node_accounts: Vec<SpiffeId>,
    /// Identities allowed to use the admin service.
    pub admins: Vec<SpiffeId>,
}

/// How a caller proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// A service-account token.
    Token,
    /// A client certificate from this CA.
    Certificate,
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Its identity.
    pub identity: SpiffeId,
    /// How it proved it.
    pub method: Method,
    /// The node its token is bound to.
    pub node: Option<String>,
    /// The pod its token is bound to (namespace, name).
    pub pod: Option<(String, String)>,
}

/// Why authentication failed (logged, never returned).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Nothing presented.
    #[error("no credentials: neither a bearer token nor a client certificate")]
    NoCredentials,
    /// The header is not `Bearer <token>`.
    #[error("malformed authorization header")]
    MalformedHeader,
    /// Tokens are not accepted here.
    #[error("token authentication is not configured (no API server and no --jwt-issuer)")]
    TokensDisabled,
    /// The token failed validation.
    #[error("invalid token")]
    InvalidToken(#[source] InvalidToken),
    /// The API server could not be asked.
    #[error("token review")]
    TokenReview(#[source] TokenReviewError),
    /// The token is valid but not a service account's.
    #[error("not a service account: {0:?}")]
    NotServiceAccount(String),
}

/// What is wrong with a token.
#[derive(Debug, thiserror::Error)]
pub enum InvalidToken {
    /// Not a JWT, a bad signature, expired, another issuer or audience, a missing claim.
    #[error(transparent)]
    Jwt(#[from] jsonwebtoken::errors::Error),
    /// Signed with an algorithm we do not accept (symmetric ones never are).
    #[error("algorithm {0:?} is not accepted")]
    Algorithm(jsonwebtoken::Algorithm),
    /// No key in the issuer's JWKS matches the token's `kid`.
    #[error("no key {0:?} in the JWKS")]
    UnknownKey(Option<String>),
    /// The API server's review did not authenticate it (its reason, as it gave it).
    #[error("the API server did not authenticate it: {0}")]
    NotAuthenticated(String),
    /// The API server's review did not check any of our audiences.
    #[error("audiences {0:?} do not include ours")]
    Audiences(Vec<String>),
    /// The service account's names do not make a SPIFFE identity.
    #[error("service account {namespace}/{name}")]
    ServiceAccount {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// Why they do not make an identity.
        #[source]
        source: proto::identity::SpiffeIdError,
    },
}

/// Why the API server could not review a token.
#[derive(Debug, thiserror::Error)]
pub enum TokenReviewError {
    /// No answer in time.
    #[error("the API server did not answer within {0:?}")]
    Timeout(Duration),
    /// The request failed.
    #[error(transparent)]
    Api(#[from] kube::Error),
}

impl AuthError {
    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::NoCredentials => "no_credentials",
            AuthError::MalformedHeader | AuthError::InvalidToken(_) | AuthError::NotServiceAccount(_) => {
                "invalid_token"
            }
            AuthError::TokensDisabled => "tokens_disabled",
            AuthError::TokenReview(_) => "token_review",
        }
    }
}

/// Checks callers.
#[derive(Debug)]
pub struct Authenticator {
    config: AuthConfig,
    /// Recent positive TokenReview answers, so a node restarting hundreds of pods does not cost
    /// hundreds of API calls. Keyed by the token's SHA-256, never the token itself.
    reviewed: std::sync::Mutex<HashMap<[u8; 32], (Caller, std::time::Instant)>>,
}

/// How long a positive TokenReview answer is reused (Kubernetes' own authenticator caches
/// successes for 2 minutes by default; a revoked token may be accepted for at most this long).
pub const TOKEN_REVIEW_CACHE_TTL: Duration = Duration::from_secs(60);

/// Entries kept at most; beyond that the cache is cleared (it refills from live traffic).
const TOKEN_REVIEW_CACHE_MAX: usize = 16_384;

/// How long a TokenReview may take before the caller is refused.
const TOKEN_REVIEW_TIMEOUT: Duration = Duration::from_secs(10);

/// The `kubernetes.io` claims of a service-account token.
#[derive(Debug, Deserialize)]
struct KubeClaims {
    #[serde(default)]
    pod: Option<Named>,
    #[serde(default)]
    node: Option<Named>,
}

#[derive(Debug, Deserialize)]
struct Named {
    name: String,
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    #[serde(rename = "kubernetes.io", default)]
    kubernetes: Option<KubeClaims>,
}

/// `system:serviceaccount:<ns>:<sa>` → (ns, sa).
fn service_account(username: &str) -> Option<(&str, &str)> {
    let rest = username.strip_prefix("system:serviceaccount:")?;
    let (ns, sa) = rest.split_once(':')?;
    (!ns.is_empty() && !sa.is_empty() && !sa.contains(':')).then_some((ns, sa))
}

const ASYMMETRIC: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

impl Authenticator {
    /// Builds the authenticator.
    pub fn new(config: AuthConfig) -> Self {
        Authenticator { config, reviewed: Default::default() }
    }

    /// The settings.
    pub fn config(&self) -> &AuthConfig {
        &self.config
    }

    /// Authenticates from the request headers and the TLS peer identity (if a client
    /// certificate was presented and verified).
    pub async fn authenticate(
        &self,
        authorization: Option<&[u8]>,
        peer_certificate: Option<&SpiffeId>,
    ) -> Result<Caller, AuthError> {
        if let Some(header) = authorization {
            let token = std::str::from_utf8(header)
                .ok()
                .and_then(|h| h.strip_prefix("Bearer "))
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .ok_or(AuthError::MalformedHeader)?;
            return self.check_token(token).await;
        }
        match peer_certificate {
            Some(id) => Ok(Caller { identity: id.clone(), method: Method::Certificate, node: None, pod: None }),
            None => Err(AuthError::NoCredentials),
        }
    }

    fn caller(&self, username: &str, node: Option<String>, pod: Option<(String, String)>) -> Result<Caller, AuthError> {
        let (ns, sa) = service_account(username).ok_or_else(|| AuthError::NotServiceAccount(username.to_owned()))?;
        let identity = SpiffeId::new(&self.config.trust_domain, ns, sa).map_err(|source| {
            AuthError::InvalidToken(InvalidToken::ServiceAccount {
                namespace: ns.to_owned(),
                name: sa.to_owned(),
                source,
            })
        })?;
        Ok(Caller { identity, method: Method::Token, node, pod })
    }

    async fn check_token(&self, token: &str) -> Result<Caller, AuthError> {
        match &self.config.tokens {
            TokenCheck::Disabled => Err(AuthError::TokensDisabled),
            TokenCheck::Local(issuer) => self.check_local(issuer, token),
            TokenCheck::TokenReview(client) => {
                let key: [u8; 32] = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes())
                    .as_ref()
                    .try_into()
                    .unwrap_or([0; 32]);
                let now = std::time::Instant::now();
                if let Some((caller, at)) = self.reviewed.lock().unwrap_or_else(|p| p.into_inner()).get(&key)
                    && now.duration_since(*at) < TOKEN_REVIEW_CACHE_TTL
                {
                    return Ok(caller.clone());
                }
                let caller = self.token_review(client.clone(), token).await?;
                let mut cache = self.reviewed.lock().unwrap_or_else(|p| p.into_inner());
                if cache.len() >= TOKEN_REVIEW_CACHE_MAX {
                    cache.retain(|_, (_, at)| now.duration_since(*at) < TOKEN_REVIEW_CACHE_TTL);
                    if cache.len() >= TOKEN_REVIEW_CACHE_MAX {
                        cache.clear();
                    }
                }
                cache.insert(key, (caller.clone(), now));
                Ok(caller)
            }
        }
    }

    fn check_local(&self, issuer: &JwtIssuer, token: &str) -> Result<Caller, AuthError> {
        let invalid = |e: jsonwebtoken::errors::Error| AuthError::InvalidToken(e.into());
        let header = jsonwebtoken::decode_header(token).map_err(invalid)?;
        if !ASYMMETRIC.contains(&header.alg) {
            return Err(AuthError::InvalidToken(InvalidToken::Algorithm(header.alg)));
        }
        let jwk = match &header.kid {
            Some(kid) => issuer.jwks.find(kid),
            None if issuer.jwks.keys.len() == 1 => issuer.jwks.keys.first(),
            None => None,
        }
        .ok_or_else(|| AuthError::InvalidToken(InvalidToken::UnknownKey(header.kid.clone())))?;
        let key = DecodingKey::from_jwk(jwk).map_err(invalid)?;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&issuer.issuer]);
        validation.set_audience(&self.config.audiences);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = 30;
        let data = jsonwebtoken::decode::<Claims>(token, &key, &validation).map_err(invalid)?;
        let claims = data.claims;
        let (ns, _) = service_account(&claims.sub).ok_or_else(|| AuthError::NotServiceAccount(claims.sub.clone()))?;
        let node = claims.kubernetes.as_ref().and_then(|k| k.node.as_ref()).map(|n| n.name.clone());
        let pod = claims.kubernetes.as_ref().and_then(|k| k.pod.as_ref()).map(|p| (ns.to_owned(), p.name.clone()));
        self.caller(&claims.sub, node, pod)
    }

    async fn token_review(&self, client: kube::Client, token: &str) -> Result<Caller, AuthError> {
        use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
        let api: kube::Api<TokenReview> = kube::Api::all(client);
        let review = TokenReview {
            spec: TokenReviewSpec { token: Some(token.to_owned()), audiences: Some(self.config.audiences.clone()) },
            ..Default::default()
        };
        let reviewed = tokio::time::timeout(TOKEN_REVIEW_TIMEOUT, api.create(&Default::default(), &review))
            .await
            .map_err(|_| AuthError::TokenReview(TokenReviewError::Timeout(TOKEN_REVIEW_TIMEOUT)))?
            .map_err(|e| AuthError::TokenReview(e.into()))?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let reason = status.error.unwrap_or_else(|| "no reason given".into());
            return Err(AuthError::InvalidToken(InvalidToken::NotAuthenticated(reason)));
        }
        // The API server only returns audiences it checked; an answer without any of ours means
        // it did not check them.
        let audiences = status.audiences.unwrap_or_default();
        if !audiences.iter().any(|a| self.config.audiences.contains(a)) {
            return Err(AuthError::InvalidToken(InvalidToken::Audiences(audiences)));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let extra = user.extra.unwrap_or_default();
        let first = |key: &str| extra.get(key).and_then(|v| v.first()).cloned();
        let node = first("authentication.kubernetes.io/node-name");
        let pod = first("authentication.kubernetes.io/pod-name");
        let ns = service_account(&username).map(|(ns, _)| ns.to_owned());
        let pod = pod.zip(ns);
        self.caller(&username, node, pod.map(|(p, ns)| (ns, p)))
    }

    /// Whether the caller may use the admin service.
    pub fn is_admin(&self, caller: &Caller) -> bool {
        self.config.admins.contains(&caller.identity)
    }
}

/// Why an authenticated caller may not have the identity it asked for (logged, never returned).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Denied {
    /// Asked for another identity without impersonation.
    #[error("caller {caller} asked for {requested}")]
    OtherIdentity {
        /// The caller.
        caller: String,
        /// What it asked for.
        requested: String,
    },
    /// The impersonation metadata and the CSR disagree.
    #[error("ImpersonatedIdentity {impersonated} does not match the CSR's identity {requested}")]
    ImpersonationMismatch {
        /// Metadata.
        impersonated: String,
        /// CSR.
        requested: String,
    },
    /// Not a node account.
    #[error("caller {0} is not a node account and may not impersonate")]
    NotNodeAccount(String),
    /// The caller's token is not bound to a node (or its pod is unknown).
    #[error("caller {0} has no node binding (token not bound to a known pod or node)")]
    NoNode(String),
    /// No pod with that identity on the caller's node.
    #[error("no pod with identity {identity} is scheduled on node {node}")]
    NotOnNode {
        /// Requested.
        identity: String,
        /// The caller's node.
        node: String,
    },
    /// Another trust domain.
    #[error("identity {0} is outside trust domain {1}")]
    TrustDomain(String, String),
    /// The pods are not loaded yet (control plane starting): the caller should retry.
    #[error("pod placement not loaded yet; retry shortly")]
    NotReady,
}

impl Denied {
    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Denied::OtherIdentity { .. } | Denied::ImpersonationMismatch { .. } | Denied::TrustDomain(..) => {
                "identity_mismatch"
            }
            Denied::NotNodeAccount(_) => "not_node_account",
            Denied::NoNode(_) | Denied::NotOnNode { .. } => "pod_not_on_node",
            Denied::NotReady => "not_ready",
        }
    }
}

/// Which identities run on which node, from the pods the control plane knows.
#[derive(Debug, Default)]
pub struct PodIndex {
    by_node: HashMap<String, HashSet<SpiffeId>>,
    pod_node: HashMap<(String, String), String>,
}

impl PodIndex {
    /// Indexes the scheduled, not finished pods.
    pub fn build(objects: &Objects, trust_domain: &str) -> Self {
        let mut index = PodIndex::default();
        for pod in objects.pods() {
            let (Some(ns), Some(name)) = (pod.metadata.namespace.as_deref(), pod.metadata.name.as_deref()) else {
                continue;
            };
            let Some(spec) = pod.spec.as_ref() else { continue };
            let Some(node) = spec.node_name.as_deref().filter(|n| !n.is_empty()) else { continue };
            let finished = pod
                .status
                .as_ref()
                .and_then(|s| s.phase.as_deref())
                .is_some_and(|p| matches!(p, "Succeeded" | "Failed"));
            if finished {
                continue;
            }
            let sa = spec.service_account_name.as_deref().filter(|s| !s.is_empty()).unwrap_or("default");
            let Ok(id) = SpiffeId::new(trust_domain, ns, sa) else { continue };
            index.by_node.entry(node.to_owned()).or_default().insert(id);
            index.pod_node.insert((ns.to_owned(), name.to_owned()), node.to_owned());
        }
        index
    }
}

/// Decides whether a caller may have an identity.
#[derive(Debug)]
pub struct NodeAuthorizer {
    trust_domain: String,
    node_accounts: Vec<SpiffeId>,
    /// `None` until the sources have loaded.
    pods: ArcSwap<Option<PodIndex>>,
}

impl NodeAuthorizer {
    /// With no pods known yet.
    pub fn new(trust_domain: String, node_accounts: Vec<SpiffeId>) -> Self {
        NodeAuthorizer { trust_domain, node_accounts, pods: ArcSwap::from_pointee(None) }
    }

    /// Replaces the pod index (after every change of the objects).
    pub fn update(&self, index: PodIndex) {
        self.pods.store(Arc::new(Some(index)));
    }

    /// The caller's node: its token's node claim, else the node of the pod its token is bound to.
    fn node_of(&self, caller: &Caller, pods: &PodIndex) -> Option<String> {
        caller.node.clone().or_else(|| caller.pod.as_ref().and_then(|p| pods.pod_node.get(p).cloned()))
    }

    /// Whether `caller` may have `requested`, asking `impersonated` (the metadata) if set.
    /// Returns the node the certificate is for when it was granted through impersonation.
    pub fn authorize(
        &self,
        caller: &Caller,
        requested: &SpiffeId,
        impersonated: Option<&str>,
    ) -> Result<Option<String>, Denied> {
        if requested.trust_domain() != self.trust_domain {
            return Err(Denied::TrustDomain(requested.to_string(), self.trust_domain.clone()));
        }
        let Some(impersonated) = impersonated else {
            if &caller.identity != requested {
                return Err(Denied::OtherIdentity {
                    caller: caller.identity.to_string(),
                    requested: requested.to_string(),
                });
            }
            return Ok(None);
        };
        if impersonated != requested.as_str() {
            return Err(Denied::ImpersonationMismatch {
                impersonated: impersonated.chars().take(256).collect(),
                requested: requested.to_string(),
            });
        }
        if !self.node_accounts.contains(&caller.identity) {
            return Err(Denied::NotNodeAccount(caller.identity.to_string()));
        }
        let loaded = self.pods.load();
        let Some(pods) = loaded.as_ref() else { return Err(Denied::NotReady) };
        let node = self.node_of(caller, pods).ok_or_else(|| Denied::NoNode(caller.identity.to_string()))?;
        if !pods.by_node.get(&node).is_some_and(|ids| ids.contains(requested)) {
            return Err(Denied::NotOnNode { identity: requested.to_string(), node });
        }
        Ok(Some(node))
    }
}

/// Mints service-account-style tokens and publishes their JWKS: the kubelet's part in the
/// one-machine mesh (there is no API server there to issue projected tokens), and in tests.
pub struct TokenSigner {
    issuer: String,
    kid: String,
    key: jsonwebtoken::EncodingKey,
    jwks: JwkSet,
}

impl fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSigner").field("issuer", &self.issuer).field("kid", &self.kid).finish_non_exhaustive()
    }
}

/// Why a [`TokenSigner`] could not be made or could not sign.
#[derive(Debug, thiserror::Error)]
pub enum SignerError {
    /// The signing key could not be generated.
    #[error("generating the token signing key")]
    Key(#[source] rcgen::Error),
    /// The key could not be described as a JWK.
    #[error("describing the token signing key as a JWK")]
    Jwk(#[source] jsonwebtoken::errors::Error),
    /// A token could not be signed.
    #[error("signing a token")]
    Sign(#[source] jsonwebtoken::errors::Error),
}

/// What a minted token says.
#[derive(Debug, Clone)]
pub struct TokenRequest<'a> {
    /// Namespace of the service account.
    pub namespace: &'a str,
    /// Service account.
    pub service_account: &'a str,
    /// Bound pod, if any.
    pub pod: Option<&'a str>,
    /// Bound node, if any.
    pub node: Option<&'a str>,
    /// Audience.
    pub audience: &'a str,
    /// Lifetime.
    pub ttl: Duration,
}

impl TokenSigner {
    /// A signer with a fresh ES256 key. `pkcs8` reuses a stored key instead.
    pub fn new(issuer: &str, pkcs8: Option<&[u8]>) -> Result<Self, SignerError> {
        let der = match pkcs8 {
            Some(der) => der.to_vec(),
            None => {
                rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(SignerError::Key)?.serialize_der()
            }
        };
        let key = jsonwebtoken::EncodingKey::from_ec_der(&der);
        let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&key, Algorithm::ES256).map_err(SignerError::Jwk)?;
        let kid = crate::authority::fingerprint(&der)[..16].to_owned();
        jwk.common.key_id = Some(kid.clone());
        jwk.common.public_key_use = Some(jsonwebtoken::jwk::PublicKeyUse::Signature);
        Ok(TokenSigner { issuer: issuer.to_owned(), kid, key, jwks: JwkSet { keys: vec![jwk] } })
    }

    /// The public keys, as a JWKS document.
    pub fn jwks(&self) -> &JwkSet {
        &self.jwks
    }

    /// The issuer.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// A signed token, issued now.
    pub fn mint(&self, req: &TokenRequest<'_>) -> Result<String, SignerError> {
        self.mint_issued_at(req, jsonwebtoken::get_current_timestamp())
    }

    /// A signed token issued at `now` (Unix seconds; tests use it for expired tokens).
    pub fn mint_issued_at(&self, req: &TokenRequest<'_>, now: u64) -> Result<String, SignerError> {
        let mut kube = serde_json::json!({
            "namespace": req.namespace,
            "serviceaccount": {"name": req.service_account},
        });
        if let Some(pod) = req.pod {
            kube["pod"] = serde_json::json!({"name": pod});
        }
        if let Some(node) = req.node {
            kube["node"] = serde_json::json!({"name": node});
        }
        let claims = serde_json::json!({
            "iss": self.issuer,
            "sub": format!("system:serviceaccount:{}:{}", req.namespace, req.service_account),
            "aud": [req.audience],
            "iat": now,
            "nbf": now,
            "exp": now + req.ttl.as_secs(),
            "kubernetes.io": kube,
        });
        let mut header = jsonwebtoken::Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.key).map_err(SignerError::Sign)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn id(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    fn authenticator(signer: &TokenSigner) -> Authenticator {
        Authenticator::new(AuthConfig {
            trust_domain: "cluster.local".into(),
            audiences: vec![DEFAULT_AUDIENCE.into()],
            tokens: TokenCheck::Local(JwtIssuer { issuer: signer.issuer().into(), jwks: signer.jwks().clone() }),
            node_accounts: vec![],
            admins: vec![],
        })
    }

    fn req<'a>() -> TokenRequest<'a> {
        TokenRequest {
            namespace: "istio-system",
            service_account: "ztunnel",
            pod: Some("ztunnel-abc"),
            node: Some("node-1"),
            audience: DEFAULT_AUDIENCE,
            ttl: Duration::from_secs(600),
        }
    }

    fn bearer(t: &str) -> Vec<u8> {
        format!("Bearer {t}").into_bytes()
    }

    #[tokio::test]
    async fn a_valid_token_gives_identity_and_binding() {
        let signer = TokenSigner::new("https://issuer.test", None).unwrap();
        let auth = authenticator(&signer);
        let caller = auth.authenticate(Some(&bearer(&signer.mint(&req()).unwrap())), None).await.unwrap();
        assert_eq!(
            caller,
            Caller {
                identity: id("spiffe://cluster.local/ns/istio-system/sa/ztunnel"),
                method: Method::Token,
                node: Some("node-1".into()),
                pod: Some(("istio-system".into(), "ztunnel-abc".into())),
            }
        );
    }

    #[tokio::test]
    async fn bad_tokens_are_refused() {
        let signer = TokenSigner::new("https://issuer.test", None).unwrap();
        let other = TokenSigner::new("https://issuer.test", None).unwrap();
        let auth = authenticator(&signer);
        let wrong_aud = signer.mint(&TokenRequest { audience: "kubernetes", ..req() }).unwrap();
        let forged = other.mint(&req()).unwrap();
        let mut tampered = signer.mint(&req()).unwrap();
        tampered.pop();
        let wrong_issuer = TokenSigner::new("https://elsewhere.test", None).unwrap();
        let auth_other_iss = authenticator(&wrong_issuer);
        let expired = signer.mint_issued_at(&req(), jsonwebtoken::get_current_timestamp() - 3600).unwrap();
        for (what, token) in [("audience", wrong_aud), ("forged", forged), ("tampered", tampered), ("expired", expired)]
        {
            let err = auth.authenticate(Some(&bearer(&token)), None).await.unwrap_err();
            assert!(matches!(err, AuthError::InvalidToken(_)), "{what}: {err}");
        }
        let err = auth_other_iss.authenticate(Some(&bearer(&signer.mint(&req()).unwrap())), None).await.unwrap_err();
        assert!(matches!(err, AuthError::InvalidToken(_)), "{err}");
        assert!(matches!(auth.authenticate(Some(b"Basic abc"), None).await.unwrap_err(), AuthError::MalformedHeader));
        assert!(matches!(auth.authenticate(None, None).await.unwrap_err(), AuthError::NoCredentials));
    }

    #[test]
    fn node_authorizer_rules() {
        let ztunnel = id("spiffe://cluster.local/ns/istio-system/sa/ztunnel");
        let authz = NodeAuthorizer::new("cluster.local".into(), vec![ztunnel.clone()]);
        let early = Caller { identity: ztunnel.clone(), method: Method::Token, node: Some("node-1".into()), pod: None };
        let client_id = id("spiffe://cluster.local/ns/demo/sa/client");
        assert_eq!(authz.authorize(&early, &client_id, Some(client_id.as_str())), Err(Denied::NotReady));
        let mut index = PodIndex::default();
        index.by_node.entry("node-1".into()).or_default().insert(id("spiffe://cluster.local/ns/demo/sa/client"));
        index.pod_node.insert(("istio-system".into(), "ztunnel-1".into()), "node-1".into());
        authz.update(index);
        let node_caller = |node: Option<&str>, pod: Option<&str>| Caller {
            identity: ztunnel.clone(),
            method: Method::Token,
            node: node.map(Into::into),
            pod: pod.map(|p| ("istio-system".into(), p.into())),
        };
        let client = id("spiffe://cluster.local/ns/demo/sa/client");
        let imp = Some(client.as_str());
        assert_eq!(authz.authorize(&node_caller(Some("node-1"), None), &client, imp), Ok(Some("node-1".into())));
        assert_eq!(authz.authorize(&node_caller(None, Some("ztunnel-1")), &client, imp), Ok(Some("node-1".into())));
        assert!(matches!(
            authz.authorize(&node_caller(Some("node-2"), None), &client, imp),
            Err(Denied::NotOnNode { .. })
        ));
        assert!(matches!(authz.authorize(&node_caller(None, None), &client, imp), Err(Denied::NoNode(_))));
        let app =
            Caller { identity: id("spiffe://cluster.local/ns/demo/sa/other"), ..node_caller(Some("node-1"), None) };
        assert!(matches!(authz.authorize(&app, &client, imp), Err(Denied::NotNodeAccount(_))));
        assert!(matches!(authz.authorize(&app, &client, None), Err(Denied::OtherIdentity { .. })));
        assert_eq!(authz.authorize(&app, &app.identity, None), Ok(None));
        assert!(matches!(
            authz.authorize(&node_caller(Some("node-1"), None), &client, Some("spiffe://cluster.local/ns/x/sa/y")),
            Err(Denied::ImpersonationMismatch { .. })
        ));
        let foreign = id("spiffe://other.domain/ns/demo/sa/client");
        assert!(matches!(authz.authorize(&app, &foreign, None), Err(Denied::TrustDomain(..))));
    }
}
