//! `omniflow export`: a blueprint as a standalone program.

use super::*;

pub fn export(args: ExportArgs) -> Result<ExitCode, Failure> {
    let target = crate::export::Target::parse(&args.target).ok_or_else(|| {
        Failure::input(format!(
            "--target {:?}: expected python, node, github-action or docker",
            args.target
        ))
    })?;
    let bp = load_blueprint(&args.blueprint, &args.dir, &load_config()?)?;
    let files = crate::export::export(&bp, target, &args.out, args.force)
        .map_err(|e| Failure::input(e.to_string()))?;
    say_err!(
        "exported {} to {} ({}):",
        bp.name,
        args.out.display(),
        target.as_str()
    );
    for f in files {
        say_out!("{}", f.display());
    }
    Ok(ExitCode::SUCCESS)
}
