//! `berth access-key …`: key pairs for SigV4 clients of the AgentCore-compatible API.

use berth_api::CreateAccessKey;

use crate::cli::AccessKeyCmd;
use crate::cmd::{client, explain};

pub async fn run(cmd: AccessKeyCmd) -> anyhow::Result<()> {
    match cmd {
        AccessKeyCmd::Create { name, remote } => {
            let key = client(&remote)?
                .create_access_key(&CreateAccessKey { name })
                .await
                .map_err(explain)?;
            println!("access key id:     {}", key.id);
            println!("secret access key: {}", key.secret_access_key);
            println!("(the secret is not shown again: store it now)");
            println!();
            println!("AWS_ACCESS_KEY_ID={}", key.id);
            println!("AWS_SECRET_ACCESS_KEY={}", key.secret_access_key);
        }
        AccessKeyCmd::List { remote } => {
            let keys = client(&remote)?.list_access_keys().await.map_err(explain)?;
            println!("{:<20}  {:<24}  {:<12}  LAST USED", "ID", "NAME", "CREATED");
            for k in keys {
                println!(
                    "{:<20}  {:<24}  {:<12}  {}",
                    k.id,
                    k.name.as_deref().unwrap_or("-"),
                    ago(k.created_at_ms),
                    k.last_used_ms.map_or_else(|| "never".to_string(), ago)
                );
            }
        }
        AccessKeyCmd::Delete { id, remote } => {
            client(&remote)?
                .delete_access_key(&id)
                .await
                .map_err(explain)?;
            println!("deleted access key {id}; requests signed with it are refused from now on");
        }
    }
    Ok(())
}

fn ago(ms: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    match ((now - ms) / 1000).max(0) {
        s if s < 60 => format!("{s}s ago"),
        s if s < 3600 => format!("{}m ago", s / 60),
        s if s < 86_400 => format!("{}h ago", s / 3600),
        s => format!("{}d ago", s / 86_400),
    }
}
