//! `omniflow validate`: blueprints checked against the schema, every problem with its path.

use super::*;

pub fn validate(args: ValidateArgs) -> Result<ExitCode, Failure> {
    // MAX_BLUEPRINT_BYTES: a file is refused before it is parsed, as every loader does.
    let max = load_config()?.limits.max_blueprint_bytes;
    let mut all_ok = true;
    let mut report = Vec::new();
    for file in &args.files {
        match blueprint::load_file(file, max) {
            Ok(bp) => {
                if !args.json {
                    say_out!("{}: ok ({} nodes)", file.display(), bp.nodes.len());
                }
                report.push(json!({ "file": file, "ok": true, "problems": [] }));
            }
            Err(blueprint::LoadError::Invalid { problems, .. }) => {
                all_ok = false;
                if !args.json {
                    for p in &problems {
                        say_out!("{}: {p}", file.display());
                    }
                }
                let ps: Vec<Value> = problems
                    .iter()
                    .map(|p| json!({ "path": p.path, "message": p.message }))
                    .collect();
                report.push(json!({ "file": file, "ok": false, "problems": ps }));
            }
            Err(e) => {
                all_ok = false;
                if !args.json {
                    say_out!("{e}");
                }
                report.push(json!({ "file": file, "ok": false, "problems": [{ "path": "", "message": e.to_string() }] }));
            }
        }
    }
    if args.json {
        say_out!(
            "{}",
            serde_json::to_string(&json!({ "ok": all_ok, "files": report })).unwrap_or_default()
        );
    }
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}
