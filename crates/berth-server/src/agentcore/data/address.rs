//! Which runtime a data-plane request names (`docs/design/agentcore-wire.md` §4, §10).
//!
//! The `{runtime}` path segment is a whole runtime ARN, percent-encoded by the client
//! (`arn%3Aaws%3A…%3Aruntime%2F<id>`). The router matches the raw path, so `%2F` does
//! not split the segment; the path extractor then decodes it. An ARN of another region
//! or account names nothing on this server (ResourceNotFoundException). A bare runtime
//! id is accepted too, with the `accountId` query parameter the model asks for.

use std::collections::HashMap;

use crate::agentcore::validate::{Checker, RUNTIME_ID};
use crate::agentcore::{AgentCoreConfig, AwsError};

/// The runtime and endpoint a request addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub runtime_id: String,
    /// The endpoint name (`qualifier`); `None` = `DEFAULT`.
    pub qualifier: Option<String>,
}

fn arn_not_here(config: &AgentCoreConfig, what: &str) -> AwsError {
    AwsError::not_found(format!(
        "agent runtime {what} not found: this server serves region {} and account {}",
        config.region, config.account_id
    ))
}

/// Parse the decoded `{runtime}` segment and the query.
pub fn parse(
    config: &AgentCoreConfig,
    segment: &str,
    query: &HashMap<String, String>,
) -> Result<Address, AwsError> {
    let account = query.get("accountId");
    if let Some(account) = account {
        if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
            return Err(AwsError::field(
                "accountId",
                "Member must satisfy regular expression pattern: [0-9]{12}",
            ));
        }
    }
    let runtime_id = if segment.starts_with("arn:") {
        let bad = || {
            AwsError::field(
                "agentRuntimeArn",
                "must be a runtime ARN arn:aws:bedrock-agentcore:<region>:<account>:runtime/<id>, \
                 or a runtime id with the accountId parameter",
            )
        };
        let parts: Vec<&str> = segment.splitn(6, ':').collect();
        let [_, partition, service, region, arn_account, resource] = parts[..] else {
            return Err(bad());
        };
        let id = resource.strip_prefix("runtime/").ok_or_else(bad)?;
        if !(partition == "aws" || partition.starts_with("aws-"))
            || service != "bedrock-agentcore"
            || !RUNTIME_ID.matches(id)
        {
            return Err(bad());
        }
        if region != config.region
            || arn_account != config.account_id
            || account.is_some_and(|a| a != &config.account_id)
        {
            return Err(arn_not_here(config, segment));
        }
        id.to_string()
    } else {
        let mut c = Checker::new();
        crate::agentcore::validate::runtime_id(&mut c, "agentRuntimeArn", segment);
        c.finish()?;
        match account {
            None => {
                return Err(AwsError::field(
                    "accountId",
                    "is required when agentRuntimeArn is a runtime id rather than an ARN",
                ))
            }
            Some(a) if a != &config.account_id => return Err(arn_not_here(config, segment)),
            Some(_) => {}
        }
        segment.to_string()
    };
    let qualifier = query.get("qualifier").filter(|q| !q.is_empty()).cloned();
    Ok(Address {
        runtime_id,
        qualifier,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::agentcore::ErrorShape;

    fn config() -> AgentCoreConfig {
        AgentCoreConfig {
            region: "eu-west-1".into(),
            account_id: "123456789012".into(),
            ..AgentCoreConfig::new("/tmp/unused")
        }
    }

    fn q(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn arns_and_bare_ids() {
        let c = config();
        let arn = "arn:aws:bedrock-agentcore:eu-west-1:123456789012:runtime/my_agent-AbCdE12345";
        assert_eq!(
            parse(&c, arn, &q(&[])).unwrap(),
            Address {
                runtime_id: "my_agent-AbCdE12345".into(),
                qualifier: None
            }
        );
        let got = parse(&c, arn, &q(&[("qualifier", "prod")])).unwrap();
        assert_eq!(got.qualifier.as_deref(), Some("prod"));
        let bare = parse(
            &c,
            "my_agent-AbCdE12345",
            &q(&[("accountId", "123456789012")]),
        )
        .unwrap();
        assert_eq!(bare.runtime_id, "my_agent-AbCdE12345");
    }

    #[test]
    fn other_regions_and_accounts_are_not_found() {
        let c = config();
        for arn in [
            "arn:aws:bedrock-agentcore:us-east-1:123456789012:runtime/a-AbCdE12345",
            "arn:aws:bedrock-agentcore:eu-west-1:999999999999:runtime/a-AbCdE12345",
        ] {
            assert_eq!(
                parse(&c, arn, &q(&[])).unwrap_err().shape,
                ErrorShape::ResourceNotFound
            );
        }
        let err = parse(&c, "a-AbCdE12345", &q(&[("accountId", "999999999999")])).unwrap_err();
        assert_eq!(err.shape, ErrorShape::ResourceNotFound);
    }

    #[test]
    fn malformed_addresses_are_validation_errors() {
        let c = config();
        for (segment, query) in [
            (
                "arn:aws:s3:eu-west-1:123456789012:runtime/a-AbCdE12345",
                q(&[]),
            ),
            (
                "arn:aws:bedrock-agentcore:eu-west-1:123456789012:gateway/x",
                q(&[]),
            ),
            ("arn:aws:bedrock-agentcore", q(&[])),
            ("a-AbCdE12345", q(&[])),
            ("not an id", q(&[("accountId", "123456789012")])),
            ("a-AbCdE12345", q(&[("accountId", "12")])),
        ] {
            let err = parse(&c, segment, &query).unwrap_err();
            assert_eq!(err.shape, ErrorShape::Validation, "{segment}");
        }
    }
}
