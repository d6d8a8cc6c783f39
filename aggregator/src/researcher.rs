//! A researcher's session: their key, the consortium policy they trust, and a network
//! client, with the defaults a person expects (the only study they are approved for, a
//! sensible rho and deadline).

use std::path::Path;
use std::time::Duration;

use renkei_policies::{SignedPolicy, VerifiedPolicy};
use renkei_protocol::{MicroRho, PrivacyRequest, SecretKey, unix_now};

use crate::client::NetworkClient;
use crate::error::AggregatorError;
use crate::federation::{
    FederatedAnswer, NodeAddress, PreparedQuery, Progress, QueryOptions, fan_out_with_progress,
};
use crate::passphrase::PassphraseSource;
use crate::sql;

/// Privacy spent per node per query when the researcher does not say: rho 0.05 gives a
/// count's noise a standard deviation of about 3.2 at each node.
pub const DEFAULT_RHO: MicroRho = MicroRho(50_000);

/// How long to wait for the slowest node by default.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(10);

/// A researcher ready to query.
#[derive(Debug)]
pub struct ResearcherSession {
    key: SecretKey,
    policy: VerifiedPolicy,
    client: NetworkClient,
}

impl ResearcherSession {
    pub fn new(key: SecretKey, policy: VerifiedPolicy, client: NetworkClient) -> Self {
        Self {
            key,
            policy,
            client,
        }
    }

    /// Loads the key (asking `passphrase` if it is encrypted) and the signed policy from
    /// files, and starts a network client.
    pub async fn open(
        key_path: &Path,
        policy_path: &Path,
        passphrase: &PassphraseSource,
    ) -> Result<Self, AggregatorError> {
        let key = SecretKey::read_file_with(key_path, || passphrase.unlock(key_path))?;
        let policy = SignedPolicy::read_file(policy_path)?.verify_self_anchored()?;
        let client = NetworkClient::start(None).await?;
        Ok(Self::new(key, policy, client))
    }

    pub fn policy(&self) -> &VerifiedPolicy {
        &self.policy
    }

    /// Every member node the policy lists an address for (its first), as the nodes to ask
    /// when none are named; `renkei-policy publish` reaches them the same way.
    pub fn member_nodes(&self) -> Result<Vec<NodeAddress>, AggregatorError> {
        let mut nodes = Vec::new();
        for member in &self.policy.bundle().members {
            let Some(address) = member.addresses.first() else {
                continue;
            };
            let full = if address.contains("/p2p/") {
                address.clone()
            } else {
                format!("{address}/p2p/{}", member.peer_id)
            };
            nodes.push(full.parse()?);
        }
        if nodes.is_empty() {
            return Err(AggregatorError::BadNodeAddress {
                address: String::new(),
                reason: format!(
                    "policy v{} lists no member addresses; name the nodes with --nodes",
                    self.policy.bundle().version
                ),
            });
        }
        Ok(nodes)
    }

    pub fn client(&self) -> &NetworkClient {
        &self.client
    }

    pub fn key(&self) -> &SecretKey {
        &self.key
    }

    /// The study to use: the one named, or the only one this researcher is approved for.
    pub fn resolve_study(&self, study: Option<&str>) -> Result<String, AggregatorError> {
        if let Some(study) = study {
            return Ok(study.to_string());
        }
        let me = self.key.public_key();
        let researcher = self.policy.bundle().researcher(&me).ok_or_else(|| {
            AggregatorError::Study(format!(
                "key {me} is not a researcher in policy v{}; name a study with --study",
                self.policy.bundle().version
            ))
        })?;
        let studies = self.policy.bundle().studies_of(&me);
        match studies.as_slice() {
            [only] => Ok(only.id.clone()),
            [] => Err(AggregatorError::Study(format!(
                "{} is approved for no study",
                researcher.name
            ))),
            many => Err(AggregatorError::Study(format!(
                "{} is approved for several studies; choose one with --study: {}",
                researcher.name,
                many.iter()
                    .map(|s| s.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    /// Default options for this researcher (their only study, [`DEFAULT_RHO`],
    /// [`DEFAULT_DEADLINE`], a secure round when the study allows only secure totals).
    pub fn default_options(&self) -> Result<QueryOptions, AggregatorError> {
        let study = self.resolve_study(None)?;
        Ok(QueryOptions {
            secure: self.secure_only(&study),
            study,
            privacy: PrivacyRequest::Zcdp { rho: DEFAULT_RHO },
            deadline: DEFAULT_DEADLINE,
            dropouts: 0,
            dry_run: false,
        })
    }

    /// Whether the policy allows `study` only secure totals.
    pub fn secure_only(&self, study: &str) -> bool {
        self.policy
            .bundle()
            .study(study)
            .is_some_and(|s| !s.per_site_answers)
    }

    /// Compiles `sql`, signs it and asks `nodes`.
    pub async fn query(
        &self,
        nodes: &[NodeAddress],
        sql_text: &str,
        options: &QueryOptions,
    ) -> Result<FederatedAnswer, AggregatorError> {
        self.query_with_progress(nodes, sql_text, options, &|_| {})
            .await
    }

    /// As [`ResearcherSession::query`], telling `progress` as each node finishes.
    pub async fn query_with_progress(
        &self,
        nodes: &[NodeAddress],
        sql_text: &str,
        options: &QueryOptions,
        progress: &(dyn Fn(Progress) + Sync),
    ) -> Result<FederatedAnswer, AggregatorError> {
        let query = sql::compile(sql_text)?;
        let prepared = PreparedQuery::sign(
            &self.key,
            query,
            options,
            // A secure round's nodes must size their noise shares by one policy: this one.
            options.secure.then(|| self.policy.bundle().version),
            nodes,
            unix_now(),
        )?;
        fan_out_with_progress(
            &self.client,
            &self.policy,
            nodes,
            &prepared,
            &self.key,
            options.deadline,
            progress,
        )
        .await
    }
}
