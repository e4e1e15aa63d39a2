//! `berth access-key` against a real server: create, list, delete; the secret is shown
//! once and sealed at rest; only the admin token may manage keys.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::Server;
use reqwest::Method;
use serde_json::Value;

/// The `AWS_ACCESS_KEY_ID=` and `AWS_SECRET_ACCESS_KEY=` values `create` printed.
fn credentials(out: &str) -> (String, String) {
    let value = |name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name}= line in {out:?}"))
            .to_string()
    };
    (value("AWS_ACCESS_KEY_ID"), value("AWS_SECRET_ACCESS_KEY"))
}

async fn call(rb: reqwest::RequestBuilder) -> (u16, Value) {
    let resp = rb.send().await.expect("send");
    let status = resp.status().as_u16();
    let body = resp.bytes().await.expect("body");
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

#[track_caller]
fn assert_unauthenticated(got: &(u16, Value)) {
    assert_eq!(got.0, 401, "{}", got.1);
    assert_eq!(got.1["error"]["code"], "unauthenticated", "{}", got.1);
    assert!(
        !got.1["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .is_empty(),
        "{}",
        got.1
    );
}

#[tokio::test]
async fn create_list_delete_through_the_cli() {
    let Some(s) = Server::start("create_list_delete_through_the_cli").await else {
        return;
    };
    let out = s
        .cli_ok(&["access-key", "create", "--name", "ci runner"])
        .await;
    let (id, secret) = credentials(&out);
    assert!(
        id.len() == 20
            && id.starts_with("BKIA")
            && id
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit()),
        "{id}"
    );
    assert_eq!(secret.len(), 40, "{secret}");
    assert!(out.contains(&format!("access key id:     {id}")), "{out}");

    // Listed with its name, never with its secret.
    let list = s.cli_ok(&["access-key", "list"]).await;
    assert!(list.contains(&id) && list.contains("ci runner"), "{list}");
    assert!(list.contains("never"), "not used yet: {list}");
    assert!(!list.contains(&secret), "{list}");
    let (status, json) = call(s.http(Method::GET, "/v1/access-keys")).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(json.as_array().map(Vec::len), Some(1), "{json}");
    assert_eq!(json[0]["id"], id.as_str());
    assert_eq!(json[0]["name"], "ci runner");
    assert!(!json.to_string().contains(&secret), "{json}");

    // Sealed at rest: the key file is the server's alone, the database has no secret.
    let key_file = s.data_dir.join("keys/access-keys.key");
    let mode =
        |p: &std::path::Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&key_file), 0o600);
    assert_eq!(mode(&s.data_dir.join("keys")), 0o700);
    for db in ["state.db", "state.db-wal"] {
        let bytes = std::fs::read(s.data_dir.join(db)).unwrap_or_default();
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "{db} holds the secret in clear"
        );
    }

    let out = s.cli_ok(&["access-key", "delete", &id]).await;
    assert!(out.contains(&id), "{out}");
    let list = s.cli_ok(&["access-key", "list"]).await;
    assert_eq!(list.lines().count(), 1, "only the header is left: {list}");

    // Deleting it again, or something that is not a key id, fails and says why.
    let (_, err, code) = s.cli(&["access-key", "delete", &id]).await;
    let err = String::from_utf8_lossy(&err);
    assert_ne!(code, 0);
    assert!(err.contains("not found") && err.contains(&id), "{err}");
    let (status, json) = call(s.http(Method::DELETE, "/v1/access-keys/not-a-key")).await;
    assert_eq!(status, 400, "{json}");
    assert_eq!(json["error"]["field"], "id", "{json}");
    let (status, json) = call(
        s.http(Method::POST, "/v1/access-keys")
            .json(&serde_json::json!({"name": "a\nb"})),
    )
    .await;
    assert_eq!(status, 400, "{json}");
    assert!(
        json["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .starts_with("name:"),
        "{json}"
    );
}

#[tokio::test]
async fn only_the_admin_token_manages_access_keys() {
    let Some(mut s) = Server::start("only_the_admin_token_manages_access_keys").await else {
        return;
    };
    let http = reqwest::Client::new();
    let url = format!("{}/v1/access-keys", s.url);
    assert_unauthenticated(&call(http.get(&url)).await);
    assert_unauthenticated(&call(http.post(&url).json(&serde_json::json!({}))).await);
    assert_unauthenticated(&call(http.delete(format!("{url}/BKIAAAAAAAAAAAAAAAAA"))).await);
    assert_unauthenticated(&call(http.get(&url).bearer_auth("berth_not_a_token")).await);

    // A valid token without the admin role (there is no API to make one yet: write it
    // into the database while the server is down).
    assert!(s.stop_server(), "server did not stop:\n{}", s.log_text());
    let user_token = "berth_test_user_token";
    {
        let store = berth_store::Store::open(&s.data_dir.join("state.db"))
            .await
            .expect("open the state database");
        store
            .insert_token("user", &berth_server::hash_token(user_token), "user", 0)
            .await
            .expect("insert a user token");
        store.close().await;
    }
    s.restart().await;
    let (status, json) = call(
        http.get(format!("{}/v1/runtimes", s.url))
            .bearer_auth(user_token),
    )
    .await;
    assert_eq!(status, 200, "the user token is valid: {json}");
    let got = call(http.get(&url).bearer_auth(user_token)).await;
    assert_unauthenticated(&got);
    assert!(
        got.1["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("admin token"),
        "{}",
        got.1
    );
    assert_unauthenticated(
        &call(
            http.post(&url)
                .bearer_auth(user_token)
                .json(&serde_json::json!({"name": 5})),
        )
        .await,
    );
    let (_, err, code) = s
        .cli(&["access-key", "create", "--token", user_token])
        .await;
    assert_ne!(code, 0);
    assert!(
        String::from_utf8_lossy(&err).contains("admin token"),
        "{}",
        String::from_utf8_lossy(&err)
    );
    // The admin token still can.
    credentials(&s.cli_ok(&["access-key", "create"]).await);
}
