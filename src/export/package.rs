//! The files around the program: README, .env.example, requirements/package.json, the GitHub
//! Actions workflow, the Dockerfile and compose file.

use super::{File, Target};
use crate::blueprint::{Blueprint, Channel, NodeKind};
use std::path::PathBuf;

fn file(path: impl Into<PathBuf>, text: impl Into<String>) -> File {
    File {
        path: path.into(),
        text: text.into(),
    }
}

/// What the blueprint needs from the environment.
struct Needs {
    llm: bool,
    telegram: bool,
    discord: bool,
}

fn needs(bp: &Blueprint) -> Needs {
    let mut n = Needs {
        llm: false,
        telegram: false,
        discord: false,
    };
    for node in &bp.nodes {
        match &node.kind {
            NodeKind::Llm(_) => n.llm = true,
            NodeKind::Notify(x) if x.channel == Channel::Telegram => n.telegram = true,
            NodeKind::Notify(_) => n.discord = true,
            _ => {}
        }
    }
    n
}

/// Secrets the program reads, for the workflow's `env:` (name, is a secret).
fn env_vars(n: &Needs) -> Vec<(&'static str, bool)> {
    let mut v = Vec::new();
    if n.llm {
        v.extend([
            ("HUGGINGFACE_TOKEN", true),
            ("HF_INFERENCE_URL", false),
            ("OPENAI_BASE_URL", false),
            ("OPENAI_API_KEY", true),
        ]);
    }
    if n.telegram {
        v.extend([("TELEGRAM_BOT_TOKEN", true), ("TELEGRAM_CHAT_ID", true)]);
    }
    if n.discord {
        v.push(("DISCORD_WEBHOOK", true));
    }
    v
}

fn env_example(bp: &Blueprint, n: &Needs) -> String {
    let mut s = format!(
        "# Configuration of {} (exported from OmniFlow). Copy to .env and fill in.\n# Never commit .env: it holds secrets.\n\n",
        bp.name
    );
    if n.llm {
        s.push_str(
            "# Models: Ollama first when USE_OLLAMA=true, then Hugging Face when a token is set,\n\
             # then an OpenAI-compatible server.\n\
             HUGGINGFACE_TOKEN=\n\
             # HF_INFERENCE_URL=https://router.huggingface.co\n\
             # USE_OLLAMA=false\n\
             # OLLAMA_URL=http://localhost:11434\n\
             # OLLAMA_MODEL=llama3.2   (Ollama's name for the model, if it differs from the blueprint's)\n\
             # OPENAI_BASE_URL=http://localhost:8080\n\
             # OPENAI_API_KEY=\n\n",
        );
    }
    if n.telegram {
        s.push_str("# Telegram: a bot token from @BotFather and the chat to post to.\nTELEGRAM_BOT_TOKEN=\nTELEGRAM_CHAT_ID=\n\n");
    }
    if n.discord {
        s.push_str("# Discord: Server Settings → Integrations → Webhooks → Copy Webhook URL.\nDISCORD_WEBHOOK=\n\n");
    }
    s.push_str(
        "# Seconds per attempt (a node's \"timeout\" wins), and retries after the first try.\n\
         # REQUEST_TIMEOUT=300\n\
         # MAX_RETRIES=3\n\
         # Run history (the runner_executions table, shared with OmniFlow).\n\
         # DB_FILE=./automation_runner.db\n\
         # Steps in flight at once.\n\
         # CONCURRENCY=32\n\
         # Test knob: multiplies every wait (retries, delays, timeouts); 0.001 = 1000x faster.\n\
         # OMNIFLOW_TIME_SCALE=1\n",
    );
    s
}

fn readme(bp: &Blueprint, target: Target, n: &Needs) -> String {
    let title = &bp.name;
    let desc = bp.description.clone().unwrap_or_default();
    let (run, files) = match target {
        Target::Node => (
            "npm install        # better-sqlite3, for the run history (optional)\nnode main.js --json",
            "- `main.js` — the program (Node 20 or newer, built-in `fetch`).\n- `package.json` — one dependency, `better-sqlite3`, for history. Without it the run\n  works and history is skipped with a warning.\n",
        ),
        _ => (
            "python3 main.py --json",
            "- `main.py` — the program (Python 3.9 or newer, standard library only).\n- `requirements.txt` — empty: nothing to install.\n",
        ),
    };
    let mut s = format!(
        "# {title}\n\n{desc}\n\nExported from OmniFlow with `omniflow export {title} --target {}`. The program is the\nblueprint: a runtime section (HTTP with retries, model providers, Telegram/Discord, history)\nfollowed by one function per node. Edit it freely.\n\n## Files\n\n{files}- `.env.example` — every setting; copy it to `.env`. Secrets are only read from the\n  environment, never written in these files.\n",
        target.as_str()
    );
    match target {
        Target::GithubAction => s.push_str(&format!(
            "- `.github/workflows/{}.yml` — runs `main.py` on the blueprint's schedule and on demand.\n",
            slug(&bp.name)
        )),
        Target::Docker => s.push_str(
            "- `Dockerfile` — `python:3.12-slim`, runs `main.py` as a non-root user; history in `/data`.\n- `docker-compose.yml` — the program, and an optional `ollama` service (profile `ollama`).\n- `.dockerignore`\n",
        ),
        _ => {}
    }
    s.push_str(&format!(
        "\n## Run\n\n```sh\ncp .env.example .env   # then fill it in\n{run}\n```\n\n`--var KEY=VALUE` overrides a variable (JSON when it parses as JSON). Exit codes: 0 success,\n1 the run failed, 2 bad input. `--json` prints one object like `omniflow run --json`.\n"
    ));
    match target {
        Target::GithubAction => {
            let secrets: Vec<String> = env_vars(n)
                .into_iter()
                .filter(|(_, secret)| *secret)
                .map(|(k, _)| format!("`{k}`"))
                .collect();
            s.push_str(&format!(
                "\n## GitHub Actions\n\nCommit these files at the root of a repository and add the secrets it needs under\nSettings → Secrets and variables → Actions: {}. Schedules are in UTC, run on the\ndefault branch, and GitHub disables them after 60 days without activity in a public\nrepository. \"Run workflow\" on the Actions tab starts a run by hand. The history database\nis uploaded as an artifact of each run.\n",
                if secrets.is_empty() { "none".to_string() } else { secrets.join(", ") }
            ));
        }
        Target::Docker => s.push_str(
            "\n## Docker\n\n```sh\ndocker compose run --rm automation --json\n# with a local model: set USE_OLLAMA=true and OLLAMA_URL=http://ollama:11434 in .env, then\ndocker compose --profile ollama up -d ollama\ndocker compose exec ollama ollama pull llama3.2\ndocker compose run --rm automation\n```\n\nThe history database lives in the `history` volume (`/data/automation_runner.db`).\n",
        ),
        _ => {}
    }
    if let Some(cron) = &bp.schedule {
        if target != Target::GithubAction {
            s.push_str(&format!(
                "\n## Schedule\n\nThe blueprint runs on `{cron}` ({}). With cron:\n\n```\n{cron} cd /path/to/this/folder && {} >> run.log 2>&1\n```\n",
                bp.timezone.as_deref().unwrap_or("UTC"),
                if target == Target::Node { "node main.js" } else { "python3 main.py" }
            ));
            let zoned =
                crate::schedule::parse_timezone(bp.timezone.as_deref()).is_ok_and(|z| !z.is_utc());
            if let (true, Some(tz)) = (zoned, bp.timezone.as_deref()) {
                s.push_str(&format!(
                    "\ncron reads that line in the host's time zone, and this schedule is in {tz}: run it on a\nhost set to {tz}, convert the hours, or (cronie) put `CRON_TZ={tz}` on the line above\n(IANA names only).\n"
                ));
            }
        }
    }
    s.push_str(
        "\n## Differences from `omniflow run`\n\n- History: only the run's row in `runner_executions` (the same columns and values OmniFlow\n  writes); steps and attempts are printed, not recorded.\n- No sandbox, no console, no priority pool: steps run on `CONCURRENCY` workers.\n",
    );
    if target == Target::Node {
        s.push_str("- JSON numbers: JavaScript has one number type, so `1.0` prints as `1`.\n");
    }
    s
}

/// A file-name-safe form of a blueprint name.
pub fn slug(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let s = s.trim_matches('-').to_string();
    if s.is_empty() {
        "automation".into()
    } else {
        s
    }
}

/// A YAML single-quoted scalar.
fn yq(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Variables that can be `workflow_dispatch` inputs and shell variable names.
fn input_names(bp: &Blueprint) -> Vec<&String> {
    bp.variables
        .keys()
        .filter(|k| {
            k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !k.starts_with(|c: char| c.is_ascii_digit())
        })
        .collect()
}

fn workflow(bp: &Blueprint, n: &Needs) -> String {
    let name = slug(&bp.name);
    let inputs = input_names(bp);
    let mut s = format!(
        "# {} — exported from OmniFlow. Runs main.py on the blueprint's schedule and on demand.\nname: {}\n\non:\n",
        bp.name,
        yq(&bp.name)
    );
    if let Some(cron) = &bp.schedule {
        s.push_str(&format!(
            "  schedule:\n    # UTC, like the blueprint's schedule.\n    - cron: {}\n",
            yq(cron)
        ));
    }
    s.push_str("  workflow_dispatch:\n");
    if !inputs.is_empty() {
        s.push_str("    inputs:\n");
        for k in &inputs {
            s.push_str(&format!(
                "      {k}:\n        description: {}\n        required: false\n        type: string\n",
                yq(&format!("Override variable {k} (JSON or text); empty keeps the default"))
            ));
        }
    }
    s.push_str(&format!(
        "\npermissions:\n  contents: read\n\nconcurrency:\n  group: {}\n  cancel-in-progress: false\n\njobs:\n  run:\n    runs-on: ubuntu-latest\n    timeout-minutes: 60\n    steps:\n      - uses: actions/checkout@v6\n      - uses: actions/setup-python@v6\n        with:\n          python-version: '3.12'\n      - name: Run {}\n        shell: bash\n        run: |\n          args=()\n",
        yq(&name),
        bp.name.replace(['\n', ':'], " ")
    ));
    for k in &inputs {
        s.push_str(&format!(
            "          if [ -n \"$INPUT_{k}\" ]; then args+=(--var \"{k}=$INPUT_{k}\"); fi\n"
        ));
    }
    s.push_str("          python3 main.py \"${args[@]}\"\n        env:\n");
    for (k, secret) in env_vars(n) {
        let src = if secret { "secrets" } else { "vars" };
        s.push_str(&format!("          {k}: ${{{{ {src}.{k} }}}}\n"));
    }
    for k in &inputs {
        s.push_str(&format!("          INPUT_{k}: ${{{{ inputs.{k} }}}}\n"));
    }
    s.push_str(
        "          DB_FILE: automation_runner.db\n      - name: Keep the run history\n        if: always()\n        uses: actions/upload-artifact@v4\n        with:\n          name: history\n          path: automation_runner.db\n          if-no-files-found: ignore\n",
    );
    s
}

const DOCKERFILE: &str = "# Exported from OmniFlow: the Python program in a small image, run as a non-root user.\nFROM python:3.12-slim\n\nENV PYTHONUNBUFFERED=1 \\\n    DB_FILE=/data/automation_runner.db\n\nRUN useradd --create-home --uid 10001 omniflow \\\n    && mkdir -p /data \\\n    && chown omniflow:omniflow /data\n\nWORKDIR /app\nCOPY main.py requirements.txt ./\n\nUSER omniflow\nVOLUME [\"/data\"]\n\n# Arguments are passed on: `docker run IMAGE --json --var KEY=VALUE`.\nENTRYPOINT [\"python3\", \"main.py\"]\nCMD []\n";

fn compose(bp: &Blueprint) -> String {
    format!(
        "# {} — exported from OmniFlow.\n#   docker compose run --rm automation --json\n#   docker compose --profile ollama up -d ollama   (a local model server, optional)\nservices:\n  automation:\n    build: .\n    env_file:\n      - path: .env\n        required: false\n    volumes:\n      - history:/data\n\n  ollama:\n    image: ollama/ollama:latest\n    profiles: [\"ollama\"]\n    volumes:\n      - ollama:/root/.ollama\n    ports:\n      - \"11434:11434\"\n\nvolumes:\n  history:\n  ollama:\n",
        bp.name
    )
}

const DOCKERIGNORE: &str =
    ".env\n*.db\n*.db-wal\n*.db-shm\n.git\n.github\n__pycache__\nnode_modules\n*.log\n";

fn package_json(bp: &Blueprint) -> String {
    let v = serde_json::json!({
        "name": slug(&bp.name),
        "version": "1.0.0",
        "private": true,
        "description": bp.description.clone().unwrap_or_else(|| format!("{} (exported from OmniFlow)", bp.name)),
        "type": "module",
        "main": "main.js",
        "engines": { "node": ">=20" },
        "scripts": { "start": "node main.js" },
        "dependencies": { "better-sqlite3": "^12.0.0" }
    });
    let mut s = serde_json::to_string_pretty(&v).unwrap_or_default();
    s.push('\n');
    s
}

/// Every file of an export, with the program's source.
pub(super) fn files(bp: &Blueprint, target: Target, code: String) -> Vec<File> {
    let n = needs(bp);
    let mut out = Vec::new();
    match target {
        Target::Node => {
            out.push(file("main.js", code));
            out.push(file("package.json", package_json(bp)));
            out.push(file(
                ".gitignore",
                ".env\nnode_modules\n*.db\n*.db-wal\n*.db-shm\n",
            ));
        }
        _ => {
            out.push(file("main.py", code));
            out.push(file(
                "requirements.txt",
                "# Nothing to install: main.py uses only the Python standard library (3.9+).\n",
            ));
            out.push(file(
                ".gitignore",
                ".env\n__pycache__/\n*.db\n*.db-wal\n*.db-shm\n",
            ));
        }
    }
    out.push(file(".env.example", env_example(bp, &n)));
    out.push(file("README.md", readme(bp, target, &n)));
    match target {
        Target::GithubAction => out.push(file(
            PathBuf::from(".github/workflows").join(format!("{}.yml", slug(&bp.name))),
            workflow(bp, &n),
        )),
        Target::Docker => {
            out.push(file("Dockerfile", DOCKERFILE));
            out.push(file("docker-compose.yml", compose(bp)));
            out.push(file(".dockerignore", DOCKERIGNORE));
        }
        _ => {}
    }
    out
}
