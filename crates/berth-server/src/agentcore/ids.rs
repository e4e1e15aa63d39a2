//! Identifiers and ARNs (`docs/design/agentcore-wire.md` §10).

use rand::Rng;

use super::AgentCoreConfig;

/// Ten random characters of `[a-zA-Z0-9]`.
pub fn suffix() -> String {
    rand::thread_rng()
        .sample_iter(&rand::distributions::Alphanumeric)
        .take(10)
        .map(char::from)
        .collect()
}

/// `<agentRuntimeName>-<10 chars>`; endpoint ids have the same form.
pub fn new_id(name: &str) -> String {
    format!("{name}-{}", suffix())
}

/// `arn:aws:bedrock-agentcore:<region>:<account>:runtime/<id>`.
pub fn runtime_arn(config: &AgentCoreConfig, runtime_id: &str) -> String {
    format!(
        "arn:aws:bedrock-agentcore:{}:{}:runtime/{runtime_id}",
        config.region, config.account_id
    )
}

/// The runtime ARN + `/runtime-endpoint/<name>`.
pub fn endpoint_arn(config: &AgentCoreConfig, runtime_id: &str, name: &str) -> String {
    format!(
        "{}/runtime-endpoint/{name}",
        runtime_arn(config, runtime_id)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agentcore::validate::{Checker, RUNTIME_ID};

    #[test]
    fn ids_and_arns_match_the_model() {
        let id = new_id("my_agent");
        assert!(RUNTIME_ID.matches(&id), "{id}");
        assert_ne!(new_id("my_agent"), id);
        let config = AgentCoreConfig {
            region: "eu-west-1".into(),
            account_id: "123456789012".into(),
            ..AgentCoreConfig::new("/tmp/unused")
        };
        assert_eq!(
            runtime_arn(&config, "a-0123456789"),
            "arn:aws:bedrock-agentcore:eu-west-1:123456789012:runtime/a-0123456789"
        );
        assert_eq!(
            endpoint_arn(&config, "a-0123456789", "DEFAULT"),
            "arn:aws:bedrock-agentcore:eu-west-1:123456789012:runtime/a-0123456789/runtime-endpoint/DEFAULT"
        );
        let mut c = Checker::new();
        crate::agentcore::validate::runtime_id(&mut c, "id", &id);
        assert!(c.finish().is_ok());
    }
}
