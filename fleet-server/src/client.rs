//! fleetctl's client of the REST API.
//!
//! The server URL and token come from flags, else `DRIFTGATE_SERVER` / `DRIFTGATE_TOKEN`,
//! else `~/.config/driftgate/fleetctl.toml` (`server = "…"`, `token = "…"`), else the URL
//! defaults to `http://127.0.0.1:8480`. Uploads stream from disk as a multipart body whose
//! length is known up front, with a progress bar on a terminal.

use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{status} {code}: {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("cannot reach the server at {url}: {cause}")]
    Transport { url: String, cause: String },
    #[error("{0}")]
    Local(String),
}

/// Where to reach the server, and as whom.
#[derive(Debug, Clone)]
pub struct ApiClient {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

#[derive(Debug, Default, Deserialize)]
struct ClientFile {
    server: Option<String>,
    token: Option<String>,
}

/// The default config file, `~/.config/driftgate/fleetctl.toml`.
pub fn default_config_file() -> Option<PathBuf> {
    std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .map(|d| d.join("driftgate").join("fleetctl.toml"))
}

impl ApiClient {
    /// Flags first, then the environment, then the config file.
    pub fn resolve(
        server: Option<String>,
        token: Option<String>,
        config_file: Option<&Path>,
    ) -> Result<ApiClient, ClientError> {
        let file = match config_file
            .map(Path::to_path_buf)
            .or_else(default_config_file)
        {
            Some(path) if path.exists() => {
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| ClientError::Local(format!("{}: {e}", path.display())))?;
                toml::from_str::<ClientFile>(&text)
                    .map_err(|e| ClientError::Local(format!("{}: {e}", path.display())))?
            }
            _ => ClientFile::default(),
        };
        let server = server
            .or_else(|| std::env::var("DRIFTGATE_SERVER").ok())
            .or(file.server)
            .unwrap_or_else(|| "http://127.0.0.1:8480".into());
        let token = token
            .or_else(|| std::env::var("DRIFTGATE_TOKEN").ok())
            .or(file.token);
        Ok(ApiClient::new(&server, token))
    }

    pub fn new(server: &str, token: Option<String>) -> ApiClient {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        ApiClient {
            base: server.trim_end_matches('/').to_string(),
            token,
            agent,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn auth(&self) -> Option<String> {
        self.token.as_ref().map(|t| format!("Bearer {t}"))
    }

    fn finish(
        &self,
        url: &str,
        response: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Value, ClientError> {
        let mut response = response.map_err(|e| ClientError::Transport {
            url: url.to_string(),
            cause: e.to_string(),
        })?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .with_config()
            .limit(256 << 20)
            .read_to_string()
            .map_err(|e| ClientError::Transport {
                url: url.to_string(),
                cause: e.to_string(),
            })?;
        let value: Value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        if (200..300).contains(&status) {
            return Ok(value);
        }
        let code = value["error"]["code"]
            .as_str()
            .unwrap_or("error")
            .to_string();
        let message = value["error"]["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| value.to_string());
        Err(ClientError::Api {
            status,
            code,
            message,
        })
    }

    pub fn get(&self, path: &str) -> Result<Value, ClientError> {
        let url = self.url(path);
        let mut request = self.agent.get(&url);
        if let Some(auth) = self.auth() {
            request = request.header("Authorization", auth);
        }
        self.finish(&url, request.call())
    }

    pub fn delete(&self, path: &str) -> Result<Value, ClientError> {
        let url = self.url(path);
        let mut request = self.agent.delete(&url);
        if let Some(auth) = self.auth() {
            request = request.header("Authorization", auth);
        }
        self.finish(&url, request.call())
    }

    pub fn post_json(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        let url = self.url(path);
        let mut request = self.agent.post(&url);
        if let Some(auth) = self.auth() {
            request = request.header("Authorization", auth);
        }
        self.finish(&url, request.send_json(body))
    }

    /// Pushes a model: manifest, artifact and optional profile, streamed from disk.
    /// `progress` is called with (bytes sent, total).
    pub fn push_model(
        &self,
        manifest: &Path,
        artifact: &Path,
        profile: Option<&Path>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Value, ClientError> {
        let local =
            |p: &Path, e: std::io::Error| ClientError::Local(format!("{}: {e}", p.display()));
        let manifest_bytes = std::fs::read(manifest).map_err(|e| local(manifest, e))?;
        // The server refuses a bad token before it reads a byte of the upload and closes the
        // connection; a client still sending would see that as a reset. Asking first turns a
        // missing, wrong or expired token into its own clear error.
        self.get("/api/v1/whoami")?;
        let mut boundary = [0u8; 12];
        getrandom::fill(&mut boundary).map_err(|e| ClientError::Local(format!("random: {e}")))?;
        let boundary = format!("driftgate-{}", hex::encode(boundary));
        let part_head = |name: &str, file: &str| {
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{file}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            )
        };
        let file_name = |p: &Path| {
            p.file_name()
                .map(|n| n.to_string_lossy().replace('"', "_"))
                .unwrap_or_else(|| "file".into())
        };
        let mut readers: Vec<Box<dyn Read + Send>> = Vec::new();
        let mut total = 0u64;
        let mut add_bytes = |readers: &mut Vec<Box<dyn Read + Send>>, bytes: Vec<u8>| {
            total += bytes.len() as u64;
            readers.push(Box::new(Cursor::new(bytes)));
        };
        add_bytes(
            &mut readers,
            part_head("manifest", &file_name(manifest)).into_bytes(),
        );
        add_bytes(&mut readers, manifest_bytes);
        let mut files = vec![("artifact", artifact)];
        if let Some(profile) = profile {
            files.push(("profile", profile));
        }
        let mut file_bytes = 0u64;
        for (name, path) in files {
            add_bytes(
                &mut readers,
                format!("\r\n{}", part_head(name, &file_name(path))).into_bytes(),
            );
            let file = std::fs::File::open(path).map_err(|e| local(path, e))?;
            let len = file.metadata().map_err(|e| local(path, e))?.len();
            file_bytes += len;
            readers.push(Box::new(file));
        }
        add_bytes(&mut readers, format!("\r\n--{boundary}--\r\n").into_bytes());
        let total = total + file_bytes;
        let mut body = Progress {
            inner: readers
                .into_iter()
                .reduce(|a, b| Box::new(a.chain(b)))
                .unwrap_or_else(|| Box::new(std::io::empty())),
            sent: 0,
            total,
            report: progress,
        };
        let url = self.url("/api/v1/models");
        let mut request = self
            .agent
            .post(&url)
            .header(
                "Content-Type",
                format!("multipart/form-data; boundary={boundary}"),
            )
            .header("Content-Length", total.to_string());
        if let Some(auth) = self.auth() {
            request = request.header("Authorization", auth);
        }
        let response = request.send(ureq::SendBody::from_reader(&mut body));
        match self.finish(&url, response) {
            // A server that refuses early may close the connection while the body is still
            // going; ask it something cheap to learn why (a bad token shows there).
            Err(e @ ClientError::Transport { .. }) => match self.get("/api/v1/models") {
                Err(api @ ClientError::Api { .. }) => Err(api),
                _ => Err(e),
            },
            other => other,
        }
    }
}

/// Counts bytes as the body is read, for the progress bar.
struct Progress<'a> {
    inner: Box<dyn Read + Send>,
    sent: u64,
    total: u64,
    report: &'a mut dyn FnMut(u64, u64),
}

impl Read for Progress<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sent += n as u64;
        (self.report)(self.sent, self.total);
        Ok(n)
    }
}
