//! The OpenAPI document for `/v1`, generated from the handlers' annotations.

use utoipa::OpenApi;

use crate::{access_keys, ports, routes, shells};

#[derive(OpenApi)]
#[openapi(
    info(title = "Berth API", description = "Native API of Berth, a self-hosted runtime for AI coding agents. Every route needs `Authorization: Bearer <token>`."),
    paths(
        routes::info,
        routes::create_runtime, routes::list_runtimes, routes::get_runtime, routes::delete_runtime,
        routes::create_session, routes::list_sessions, routes::get_session, routes::stop_session, routes::delete_session,
        routes::run_command, routes::signal_command,
        routes::read_file, routes::write_file,
        shells::open_shell, shells::list_shells, shells::kill_shell, shells::shell_recording, shells::attach_shell,
        ports::connect_port,
        access_keys::create_access_key, access_keys::list_access_keys, access_keys::delete_access_key,
    ),
    components(schemas(berth_api::ErrorBody, berth_api::ApiError, berth_api::ErrorCode, berth_api::CommandEvent, berth_api::ShellStatus, berth_api::shell::ResizeMessage)),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    #[test]
    fn open_shell_documents_its_working_directory() {
        let doc = serde_json::to_value(super::document()).unwrap();
        let cwd = &doc["components"]["schemas"]["OpenShell"]["properties"]["cwd"];
        let about = cwd["description"].as_str().unwrap_or_default();
        assert!(about.contains("workspace path"), "{cwd}");
    }
}
