//! `omniflow health`: asks a running process's `/healthz` (or `/readyz`) and exits 0 on 200.
//! The Docker image has no curl; this is its `HEALTHCHECK`. Prints the answer's body (JSON)
//! on stdout, a one-line reason on stderr when it fails.

use super::{Failure, HealthArgs};
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

/// The URL to probe: `--url`, else `/healthz` (`/readyz`) on `OMNIFLOW_LISTEN`.
fn target(args: &HealthArgs) -> Result<String, Failure> {
    if let Some(url) = &args.url {
        return Ok(url.clone());
    }
    let config = super::commands::load_config()?;
    let Some(mut addr) = config.listen else {
        return Err(Failure::input(
            "nothing to probe: set OMNIFLOW_LISTEN (as for the daemon) or pass --url http://127.0.0.1:9464/healthz",
        ));
    };
    // A listener on every interface is reached on loopback from inside its own host.
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let path = if args.ready { "readyz" } else { "healthz" };
    Ok(format!("http://{addr}/{path}"))
}

pub fn health(args: HealthArgs) -> Result<ExitCode, Failure> {
    let url = target(&args)?;
    let rt = super::commands::runtime()?;
    let timeout = Duration::from_secs(args.timeout.max(1));
    let got = rt.block_on(async {
        // A probe of our own listener must not go through a proxy from the environment.
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(timeout)
            .build()
            .map_err(|e| e.to_string())?;
        let mut resp = client.get(&url).send().await.map_err(|e| {
            let e = e.without_url();
            format!("no answer from {url}: {e}")
        })?;
        let status = resp.status();
        // Bodies are small JSON; reading stops at 4 KiB whatever the server sends.
        let mut body = Vec::new();
        while let Ok(Some(chunk)) = resp.chunk().await {
            body.extend_from_slice(&chunk);
            if body.len() >= 4096 {
                body.truncate(4096);
                break;
            }
        }
        Ok::<_, String>((status, String::from_utf8_lossy(&body).into_owned()))
    });
    match got {
        Ok((status, body)) => {
            let _ = writeln!(std::io::stdout(), "{}", body.trim_end());
            if status.is_success() {
                Ok(ExitCode::SUCCESS)
            } else {
                let _ = writeln!(std::io::stderr(), "unhealthy: {url} answered {status}");
                Ok(ExitCode::from(1))
            }
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "unhealthy: {e}");
            Ok(ExitCode::from(1))
        }
    }
}
