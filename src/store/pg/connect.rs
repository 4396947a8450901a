//! Reaching PostgreSQL from `DATABASE_URL`: parsing, TLS as libpq's `sslmode` means it, and
//! errors worded for the person who has to fix them. The password never leaves this module:
//! everything shown (logs, errors, `doctor`, the console) uses [`PgTarget::shown`].

use postgres::config::{Host, SslMode};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres_rustls::MakeRustlsConnect;

/// How long a connection attempt may take before it is reported as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether and how the server's certificate is checked, with libpq's meaning of `sslmode`:
/// `disable` no TLS; `prefer` (the default) and `require` encrypt without checking the
/// certificate (a local server's self-signed one must work); `verify-ca` and `verify-full`
/// check it against the public roots and `sslrootcert`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tls {
    Disable,
    Prefer,
    Require,
    Verify { roots: Option<PathBuf> },
}

/// A parsed `DATABASE_URL`: what to connect to, and how to show it without the password.
#[derive(Clone)]
pub struct PgTarget {
    config: postgres::Config,
    tls: Tls,
    shown: String,
    /// Connections of the process's shared pool (see [`pool_size`]).
    pool: u32,
}

/// The shared pool's size for a process whose pool runs `concurrency` steps at once: the
/// history's reads and every queue statement (claims, completions, enqueues, lease
/// heartbeats, result reads, rate-limit takes) share it, beside the history writer and the
/// `LISTEN` connection, which stay dedicated. Each of those statements takes a millisecond or
/// two and is batched per claim or per fan-out, so two connections carry a pool of 40 (a
/// 200-item fan-out over 3 processes took as long as with the seven connections each held
/// before the pool was shared); one more per 40 steps in flight is for the per-call
/// rate-limit takes, which are not batched. At most 8.
pub fn pool_size(concurrency: usize) -> u32 {
    let extra = u32::try_from(concurrency.saturating_sub(1) / 40).unwrap_or(u32::MAX);
    2u32.saturating_add(extra).min(8)
}

/// The command this process runs, in its connections' `application_name` (set once, by the
/// CLI, before anything connects).
static COMMAND: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Names this process's connections in `pg_stat_activity` after `command` (`daemon`, `tui`,
/// `run`, …): `omniflow daemon web-1:4242`. A URL's own `application_name` wins.
pub fn set_command(command: &str) {
    let _ = COMMAND.set(command.to_string());
}

/// `omniflow [command] host:pid`, within PostgreSQL's 63 bytes (the host is shortened).
fn application_name() -> String {
    let host = crate::store::transitions::hostname().unwrap_or_else(|| "localhost".into());
    let host: String = host.chars().take(32).collect();
    let pid = std::process::id();
    match COMMAND.get() {
        Some(c) => format!(
            "omniflow {} {host}:{pid}",
            c.chars().take(12).collect::<String>()
        ),
        None => format!("omniflow {host}:{pid}"),
    }
}

impl std::fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTarget")
            .field("shown", &self.shown)
            .field("tls", &self.tls)
            .finish()
    }
}

impl std::fmt::Display for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

/// True when `DATABASE_URL`'s value names PostgreSQL (a URL or libpq's `key=value` form).
pub fn is_postgres_url(s: &str) -> bool {
    let s = s.trim();
    s.starts_with("postgres://") || s.starts_with("postgresql://") || s.contains("host=")
}

impl PgTarget {
    /// Parses `postgres://user:password@host:port/db?sslmode=…&sslrootcert=…` or the
    /// `host=… user=… dbname=…` form. The error never repeats the input (it may hold the
    /// password).
    pub fn parse(url: &str) -> Result<PgTarget, String> {
        let url = url.trim();
        let (rest, sslmode, rootcert) = if url.contains("://") {
            split_url(url)?
        } else {
            split_pairs(url)
        };
        let mut config: postgres::Config = rest.parse().map_err(|e: postgres::Error| {
            // The parser's messages name the option, not its value.
            format!(
                "DATABASE_URL is not a valid PostgreSQL URL ({}): write it as \
                 postgres://USER:PASSWORD@HOST:5432/DATABASE",
                strip_source(&e)
            )
        })?;
        let tls = match sslmode.as_deref() {
            None | Some("prefer") | Some("allow") => Tls::Prefer,
            Some("disable") => Tls::Disable,
            Some("require") => match rootcert {
                // libpq: a root certificate given with `require` means verify-ca.
                Some(r) => Tls::Verify { roots: Some(r) },
                None => Tls::Require,
            },
            Some("verify-ca") | Some("verify-full") => Tls::Verify { roots: rootcert },
            Some(other) => {
                return Err(format!(
                    "DATABASE_URL has sslmode={other}, which is not one of disable, prefer, \
                     require, verify-ca, verify-full"
                ))
            }
        };
        config.ssl_mode(match tls {
            Tls::Disable => SslMode::Disable,
            Tls::Prefer => SslMode::Prefer,
            Tls::Require | Tls::Verify { .. } => SslMode::Require,
        });
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name(&application_name());
        }
        if config.get_hosts().is_empty() {
            return Err("DATABASE_URL names no host: write it as \
                 postgres://USER:PASSWORD@HOST:5432/DATABASE"
                .into());
        }
        let shown = show(&config);
        Ok(PgTarget {
            config,
            tls,
            shown,
            // `CONCURRENCY`'s default; `Config::database` sets the configured one.
            pool: pool_size(40),
        })
    }

    /// The same target with a shared pool of `connections` (at least 1).
    pub fn with_pool_size(mut self, connections: u32) -> PgTarget {
        self.pool = connections.max(1);
        self
    }

    /// Connections of the process's shared pool.
    pub fn pool_size(&self) -> u32 {
        self.pool
    }

    /// `postgres://user:***@host:5432/db`: the target as every message shows it.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// The TLS mode in force.
    pub fn tls(&self) -> &Tls {
        &self.tls
    }

    /// The database name (the user's name when the URL names none, as libpq does).
    pub fn dbname(&self) -> String {
        self.config
            .get_dbname()
            .or(self.config.get_user())
            .unwrap_or("postgres")
            .to_string()
    }

    /// The same server and credentials, another database (tests make scratch databases).
    pub fn with_dbname(&self, db: &str) -> PgTarget {
        let mut config = self.config.clone();
        config.dbname(db);
        let shown = show(&config);
        PgTarget {
            config,
            tls: self.tls.clone(),
            shown,
            pool: self.pool,
        }
    }

    /// The driver's configuration (for connection pools).
    pub fn config(&self) -> &postgres::Config {
        &self.config
    }

    /// The TLS connector for this target's `sslmode`.
    pub fn connector(&self) -> Result<MakeRustlsConnect, String> {
        tls_connector(&self.tls)
    }

    /// One blocking connection. Must not be called on an async runtime's thread (the driver
    /// runs its own); use `spawn_blocking` or a plain thread.
    pub fn connect(&self) -> Result<postgres::Client, String> {
        let tls = self.connector()?;
        self.config
            .connect(tls)
            .map_err(|e| describe(&e, self, "connect"))
    }
}

/// Pulls `sslmode` and `sslrootcert` out of a URL (the driver knows neither `verify-*` nor
/// `sslrootcert`) and gives back the rest.
fn split_url(url: &str) -> Result<(String, Option<String>, Option<PathBuf>), String> {
    let mut parsed = url::Url::parse(url).map_err(|e| {
        format!(
            "DATABASE_URL is not a valid URL ({e}): write it as \
             postgres://USER:PASSWORD@HOST:5432/DATABASE (percent-encode special characters \
             in the password)"
        )
    })?;
    if !matches!(parsed.scheme(), "postgres" | "postgresql") {
        return Err(format!(
            "DATABASE_URL starts with {}://, not postgres://: OmniFlow's fleet database is \
             PostgreSQL (leave DATABASE_URL unset to use SQLite at DB_FILE)",
            parsed.scheme()
        ));
    }
    let mut sslmode = None;
    let mut rootcert = None;
    // The other parameters are passed on as written: encoded again as a form, a space
    // (`options=-c%20statement_timeout%3D5000`) would become a `+`, which the driver, like
    // libpq, keeps as a plus sign.
    let mut kept: Vec<&str> = Vec::new();
    for pair in parsed.query().unwrap_or("").split('&') {
        let (k, v) = url::form_urlencoded::parse(pair.as_bytes())
            .next()
            .unwrap_or_default();
        match k.as_ref() {
            "" => {}
            "sslmode" => sslmode = Some(v.into_owned()),
            "sslrootcert" => rootcert = Some(PathBuf::from(v.as_ref())),
            _ => kept.push(pair),
        }
    }
    let kept = kept.join("&");
    parsed.set_query((!kept.is_empty()).then_some(kept.as_str()));
    Ok((parsed.to_string(), sslmode, rootcert))
}

fn split_pairs(s: &str) -> (String, Option<String>, Option<PathBuf>) {
    let mut sslmode = None;
    let mut rootcert = None;
    let rest: Vec<&str> = s
        .split_whitespace()
        .filter(|kv| {
            if let Some(v) = kv.strip_prefix("sslmode=") {
                sslmode = Some(v.to_string());
                false
            } else if let Some(v) = kv.strip_prefix("sslrootcert=") {
                rootcert = Some(PathBuf::from(v));
                false
            } else {
                true
            }
        })
        .collect();
    (rest.join(" "), sslmode, rootcert)
}

fn show(config: &postgres::Config) -> String {
    let user = config.get_user().unwrap_or("");
    let secret = if config.get_password().is_some() {
        ":***"
    } else {
        ""
    };
    let at = if user.is_empty() && secret.is_empty() {
        String::new()
    } else {
        format!("{user}{secret}@")
    };
    let host = host_port(config);
    let db = config.get_dbname().unwrap_or("");
    format!("postgres://{at}{host}/{db}")
}

fn host_port(config: &postgres::Config) -> String {
    let port = config.get_ports().first().copied().unwrap_or(5432);
    match config.get_hosts().first() {
        Some(Host::Tcp(h)) if h.contains(':') => format!("[{h}]:{port}"),
        Some(Host::Tcp(h)) => format!("{h}:{port}"),
        Some(Host::Unix(p)) => format!("{}:{port}", p.display()),
        None => format!("localhost:{port}"),
    }
}

/// The innermost cause's words, without the driver's "invalid connection string" prefix.
fn strip_source(e: &postgres::Error) -> String {
    use std::error::Error;
    let mut text = e.to_string();
    let mut cur: Option<&dyn Error> = e.source();
    while let Some(s) = cur {
        text = s.to_string();
        cur = s.source();
    }
    text
}

/// A driver error worded with its fix, as "PostgreSQL at …: cannot {doing}: …"; `doing` is
/// a verb with its object ("connect", "enqueue steps", "read the version"). Never includes
/// the password: only [`PgTarget::shown`] names the server.
pub fn describe(e: &postgres::Error, target: &PgTarget, doing: &str) -> String {
    format!(
        "PostgreSQL at {}: cannot {doing}: {}",
        target.shown(),
        explain(e)
    )
}

/// Like [`describe`], with `doing` as the store words it ("reading runs", "migrating"):
/// "PostgreSQL at … failed while {doing}: …".
pub fn describe_while(e: &postgres::Error, target: &PgTarget, doing: &str) -> String {
    format!(
        "PostgreSQL at {} failed while {doing}: {}",
        target.shown(),
        explain(e)
    )
}

/// A driver error's text and what to do about it, without the server or what was being done
/// (for a message that names both already): "the server refused it: {its message} ({code}):
/// {fix}" when the server sent an error, else the client's words and their fix (the
/// connection, TLS, the protocol).
pub fn explain(e: &postgres::Error) -> String {
    use postgres::error::SqlState;
    if let Some(db) = e.as_db_error() {
        let code = db.code();
        let fix = if *code == SqlState::INVALID_PASSWORD
            || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
        {
            "check the user and password in DATABASE_URL"
        } else if *code == SqlState::INVALID_CATALOG_NAME {
            "create the database (`createdb NAME`, or CREATE DATABASE in psql) or fix its name in DATABASE_URL"
        } else if *code == SqlState::INSUFFICIENT_PRIVILEGE {
            "grant the user CREATE and USAGE on the database's public schema, or use the database's owner in DATABASE_URL"
        } else if *code == SqlState::TOO_MANY_CONNECTIONS {
            "raise max_connections on the server or run fewer omniflow processes (each holds a few connections)"
        } else if *code == SqlState::READ_ONLY_SQL_TRANSACTION {
            "DATABASE_URL points at a read-only standby: point it at the primary"
        } else {
            // The server's message is all there is to say.
            return format!("the server refused it: {} ({})", db.message(), code.code());
        };
        return format!(
            "the server refused it: {} ({}): {fix}",
            db.message(),
            code.code()
        );
    }
    let cause = strip_source(e);
    let fix = fix_for(&cause, e.is_closed());
    format!("{cause}: {fix}")
}

/// What to do about a failure to reach the server, from the client's words for it (`closed`:
/// the connection was closed under it).
fn fix_for(cause: &str, closed: bool) -> &'static str {
    let lower = cause.to_ascii_lowercase();
    if lower.contains("certificate") || lower.contains("tls") || lower.contains("ssl") {
        "for a server without TLS add ?sslmode=disable to DATABASE_URL; for a private CA add sslrootcert=/path/to/ca.pem"
    } else if lower.contains("refused") || lower.contains("timed out") || lower.contains("timeout")
    {
        "is PostgreSQL running and listening there? check the host and port in DATABASE_URL"
    } else if lower.contains("resolve")
        || lower.contains("lookup")
        || lower.contains("name or service")
    {
        "check the host name in DATABASE_URL"
    } else if closed {
        "the connection was closed; OmniFlow reconnects, check the server if this repeats"
    } else {
        "check DATABASE_URL and that the server is up"
    }
}

/// The rustls connector for a TLS mode. `ring` is the provider (the one reqwest already
/// builds); the public roots are webpki's.
pub fn tls_connector(tls: &Tls) -> Result<MakeRustlsConnect, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot set up TLS: {e}"))?;
    let config = match tls {
        Tls::Verify { roots } => {
            let mut store = rustls::RootCertStore::empty();
            store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            if let Some(path) = roots {
                for cert in read_pem_certs(path)? {
                    store.add(cert).map_err(|e| {
                        format!(
                            "sslrootcert {}: not a usable CA certificate: {e}",
                            path.display()
                        )
                    })?;
                }
            }
            builder.with_root_certificates(store).with_no_client_auth()
        }
        Tls::Disable | Tls::Prefer | Tls::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider)))
            .with_no_client_auth(),
    };
    Ok(MakeRustlsConnect::new(config))
}

fn read_pem_certs(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read sslrootcert {}: {e}", path.display()))?
        .collect();
    let certs = certs.map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "sslrootcert {} holds no PEM certificate",
            path.display()
        ));
    }
    Ok(certs)
}

/// `sslmode=require` as libpq means it: the channel is encrypted and the handshake's
/// signatures are checked, but the certificate's issuer is not (hosted servers and local
/// ones often use certificates no public root signed; `verify-ca` is the checked mode).
#[derive(Debug)]
struct EncryptOnly(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A refusal by the server comes with the fix for that refusal: a database that does not
    /// exist is to be created (not a password to check).
    #[test]
    fn a_missing_database_is_named_with_how_to_create_it() {
        let Some(db) = super::super::testing::ScratchDb::new("connect_missing") else {
            return;
        };
        let missing = db.url().replace(db.name(), "omniflow_no_such_database");
        let Err(e) = PgTarget::parse(&missing).unwrap().connect() else {
            panic!("a database that does not exist was connected to");
        };
        assert!(e.contains("omniflow_no_such_database"), "{e}");
        assert!(e.contains("create the database (`createdb NAME`"), "{e}");
        assert!(!e.contains("password"), "{e}");
    }

    /// A user the server does not know (28000; a wrong password is 28P01 and gets the same
    /// fix) is told to check the user and password in DATABASE_URL.
    #[test]
    fn an_unknown_user_is_told_to_check_the_user_and_password() {
        let Some(db) = super::super::testing::ScratchDb::new("connect_unknown_user") else {
            return;
        };
        let (scheme, rest) = db.url().split_once("://").unwrap();
        let server = rest.split_once('@').map_or(rest, |(_, server)| server);
        let url = format!("{scheme}://omniflow_no_such_user@{server}");
        let Err(e) = PgTarget::parse(&url).unwrap().connect() else {
            panic!("a user that does not exist connected");
        };
        assert!(e.contains("omniflow_no_such_user"), "{e}");
        assert!(e.contains("(28000)"), "{e}");
        assert!(
            e.ends_with("check the user and password in DATABASE_URL"),
            "{e}"
        );
    }

    #[test]
    fn the_password_is_never_shown() {
        let t =
            PgTarget::parse("postgres://app:s3cr3t%21@db.example.com:6543/prod?sslmode=require")
                .unwrap();
        assert_eq!(t.shown(), "postgres://app:***@db.example.com:6543/prod");
        assert!(!format!("{t:?}").contains("s3cr3t"));
        assert_eq!(t.tls(), &Tls::Require);
        assert_eq!(t.dbname(), "prod");
    }

    /// Session options in the URL reach the server as written: a space stays a space.
    #[test]
    fn url_options_keep_their_spaces() {
        let t = PgTarget::parse(
            "postgres://u@h/d?sslmode=disable&options=-c%20statement_timeout%3D5000&application_name=a%2Bb",
        )
        .unwrap();
        assert_eq!(t.config().get_options(), Some("-c statement_timeout=5000"));
        assert_eq!(t.config().get_application_name(), Some("a+b"));
        assert_eq!(t.tls(), &Tls::Disable);
        // Stray `&`s, as a URL pieced together in a shell script has, are no parameter.
        let t = PgTarget::parse("postgres://u@h/d?&application_name=x&&sslmode=disable&").unwrap();
        assert_eq!(t.config().get_application_name(), Some("x"));
        assert_eq!(t.tls(), &Tls::Disable);
    }

    #[test]
    fn sslmode_follows_libpq() {
        let t = PgTarget::parse("postgres://u@h/d").unwrap();
        assert_eq!(t.tls(), &Tls::Prefer);
        let t = PgTarget::parse("postgres://u@h/d?sslmode=disable&application_name=x").unwrap();
        assert_eq!(t.tls(), &Tls::Disable);
        let t =
            PgTarget::parse("postgres://u@h/d?sslmode=verify-full&sslrootcert=/ca.pem").unwrap();
        assert_eq!(
            t.tls(),
            &Tls::Verify {
                roots: Some("/ca.pem".into())
            }
        );
        let t = PgTarget::parse("host=h user=u dbname=d sslmode=require").unwrap();
        assert_eq!(t.tls(), &Tls::Require);
        assert_eq!(t.shown(), "postgres://u@h:5432/d");
    }

    #[test]
    fn bad_urls_name_the_problem_without_the_secret() {
        let e = PgTarget::parse("mysql://root:hunter2@h/d").unwrap_err();
        assert!(e.contains("mysql://") && !e.contains("hunter2"), "{e}");
        let e = PgTarget::parse("postgres://u:hunter2@h/d?sslmode=sometimes").unwrap_err();
        assert!(
            e.contains("sslmode=sometimes") && !e.contains("hunter2"),
            "{e}"
        );
        let e = PgTarget::parse("postgres://u:hunter2@h/d?bogus_option=1").unwrap_err();
        assert!(e.contains("bogus_option") && !e.contains("hunter2"), "{e}");
    }

    #[test]
    fn the_shared_pool_grows_with_concurrency_within_bounds() {
        assert_eq!(pool_size(1), 2);
        assert_eq!(pool_size(40), 2);
        assert_eq!(pool_size(41), 3);
        assert_eq!(pool_size(120), 4);
        assert_eq!(pool_size(4096), 8);
        let t = PgTarget::parse("postgres://u@h/d")
            .unwrap()
            .with_pool_size(0);
        assert_eq!(t.pool_size(), 1);
        // A URL's own application_name is kept; otherwise the process names itself.
        let own = PgTarget::parse("postgres://u@h/d?application_name=mine").unwrap();
        assert_eq!(own.config().get_application_name(), Some("mine"));
        let ours = PgTarget::parse("postgres://u@h/d").unwrap();
        let name = ours.config().get_application_name().unwrap_or("");
        assert!(name.starts_with("omniflow "), "{name}");
        assert!(
            name.ends_with(&format!(":{}", std::process::id())),
            "{name}"
        );
        assert!(name.len() < 64, "{name}");
    }

    /// The client's words for each failure, as they come (the resolver's from glibc through
    /// std, the rest from tokio-postgres and rustls), each with its own fix.
    #[test]
    fn each_way_of_not_reaching_the_server_gets_its_fix() {
        let host = "check the host name in DATABASE_URL";
        let port =
            "is PostgreSQL running and listening there? check the host and port in DATABASE_URL";
        let tls = "for a server without TLS add ?sslmode=disable to DATABASE_URL; for a private CA add sslrootcert=/path/to/ca.pem";
        for (cause, closed, fix) in [
            (
                "failed to lookup address information: Name or service not known",
                false,
                host,
            ),
            // A resolver that cannot be reached (no DNS server answering).
            (
                "failed to lookup address information: Temporary failure in name resolution",
                false,
                host,
            ),
            ("could not resolve host db.internal", false, host),
            ("Name or service not known", false, host),
            ("Connection refused (os error 111)", false, port),
            ("timed out connecting to the server", false, port),
            ("invalid peer certificate: UnknownIssuer", false, tls),
            (
                "error performing TLS handshake: received fatal alert",
                false,
                tls,
            ),
            ("server does not support SSL", false, tls),
            (
                "connection closed",
                true,
                "the connection was closed; OmniFlow reconnects, check the server if this repeats",
            ),
            (
                "unexpected message from server",
                false,
                "check DATABASE_URL and that the server is up",
            ),
        ] {
            assert_eq!(fix_for(cause, closed), fix, "{cause}");
        }
    }

    /// A host name no resolver knows (`.invalid` never resolves): the message names the host
    /// name as the thing to check.
    #[test]
    fn an_unknown_host_names_the_host_name() {
        let t = PgTarget::parse("postgres://u@no-such-host.invalid/d?sslmode=disable").unwrap();
        let e = t.connect().err().expect("no such host");
        assert!(e.contains("check the host name in DATABASE_URL"), "{e}");
    }

    /// What a target prints as: its URL without the password, as in every message.
    #[test]
    fn a_target_prints_without_its_password() {
        let t = PgTarget::parse("postgres://app:s3cr3t@db.example.com/prod").unwrap();
        assert_eq!(t.to_string(), "postgres://app:***@db.example.com:5432/prod");
    }

    /// A private CA for `verify-ca` (a self-signed certificate made for this test; only its
    /// public half).
    const CA: &str = "\
-----BEGIN CERTIFICATE-----
MIIBjTCCATOgAwIBAgIUPJZ+rBTtaiML2XXyBzhDdkf2tc4wCgYIKoZIzj0EAwIw
GzEZMBcGA1UEAwwQb21uaWZsb3cgdGVzdCBDQTAgFw0yNjEyMDcxMjMxMTdaGA8y
MTI2MTExMzEyMzExN1owGzEZMBcGA1UEAwwQb21uaWZsb3cgdGVzdCBDQTBZMBMG
ByqGSM49AgEGCCqGSM49AwEHA0IABBzsE2dT5i2UBq/5WxmMAzmpdiZakkCcH8eZ
/C5Yga+LMThC2Lz+pk0d/8xMrmEYjTsT6FBm8W07XKSiJo0WulijUzBRMB0GA1Ud
DgQWBBTs6PQItNHzC1t5brBMUM/22sj+eTAfBgNVHSMEGDAWgBTs6PQItNHzC1t5
brBMUM/22sj+eTAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0gAMEUCIEhe
Xo0PF+qpK8dWvKzupvWHYMTaFBrVh9wKft37v+LWAiEAp0aytx4LnZ3meOV9ehMB
MFtJMG+RXngjV0sDNQHj4s4=
-----END CERTIFICATE-----
";

    /// `sslrootcert`: a file of PEM certificates is taken as the roots to verify against; a
    /// file without one, or none at all, is named before any connection is tried.
    #[test]
    fn a_root_certificate_file_is_read_or_its_problem_named() {
        let dir = tempfile::tempdir().unwrap();
        let connector = |file: &str| {
            let path = dir.path().join(file);
            PgTarget::parse(&format!(
                "postgres://u@127.0.0.1:1/d?sslmode=verify-ca&sslrootcert={}",
                path.display()
            ))
            .unwrap()
            .connector()
            .err()
        };
        std::fs::write(dir.path().join("ca.pem"), CA).unwrap();
        assert_eq!(connector("ca.pem"), None);
        std::fs::write(dir.path().join("notes.pem"), "not a certificate\n").unwrap();
        let e = connector("notes.pem").expect("a file without a certificate was taken");
        assert!(e.contains("notes.pem holds no PEM certificate"), "{e}");
        let e = connector("missing.pem").expect("a missing file was taken");
        assert!(e.contains("cannot read sslrootcert"), "{e}");
    }

    #[test]
    fn an_unreachable_server_names_the_fix() {
        // Port 1 on loopback: nothing listens there, the refusal is immediate.
        let t = PgTarget::parse("postgres://u:hunter2@127.0.0.1:1/d?sslmode=disable").unwrap();
        let e = t.connect().err().expect("nothing listens on port 1");
        assert!(
            e.contains("127.0.0.1:1") && e.contains("DATABASE_URL"),
            "{e}"
        );
        assert!(!e.contains("hunter2"), "{e}");
    }
}

#[cfg(test)]
mod server_tests {
    use super::*;
    use crate::store::pg::testing::ScratchDb;

    #[test]
    fn a_scratch_database_answers_in_every_sslmode_the_server_allows() {
        let Some(db) = ScratchDb::new("connect_modes") else {
            return;
        };
        let mut c = db.target().connect().expect("connect");
        let ssl: String = c.query_one("SHOW ssl", &[]).unwrap().get(0);
        let row = c.query_one("SELECT current_database()", &[]).unwrap();
        assert_eq!(row.get::<_, String>(0), db.name());
        let modes: &[&str] = if ssl == "on" {
            &["disable", "prefer", "require"]
        } else {
            &["disable", "prefer"]
        };
        for mode in modes {
            let url = format!(
                "{}?sslmode={mode}",
                db.url().split('?').next().unwrap_or("")
            );
            let mut c = PgTarget::parse(&url)
                .unwrap()
                .connect()
                .unwrap_or_else(|e| panic!("{mode}: {e}"));
            let encrypted: bool = c
                .query_one(
                    "SELECT coalesce((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), false)",
                    &[],
                )
                .unwrap()
                .get(0);
            assert_eq!(
                encrypted,
                *mode != "disable" && ssl == "on",
                "sslmode={mode}"
            );
        }
    }
}
