//! `omniflow` / `omniflow tui`: the console.

use super::*;

pub fn tui(args: TuiArgs) -> Result<ExitCode, Failure> {
    let mut config = load_config()?;
    if args.listen.is_some() {
        config.listen = args.listen;
    }
    if !std::io::stdout().is_terminal() {
        return Err(Failure::input(
            "the console needs a terminal (stdout is not one); for scripts use `omniflow run`, \
             `omniflow runs` and `omniflow show`",
        ));
    }
    // A shared PostgreSQL database is opened here, so that a bad or unreachable one ends the
    // start with exit 2 and its fix, before the terminal is taken over (the console's
    // temporary-database fallback is for a local file only: never for a fleet's database).
    let shared = match config.database().map_err(Failure::input)? {
        crate::store::Location::Postgres(_) => Some(open_store(&config)?),
        crate::store::Location::Sqlite(_) => None,
    };
    let interrupted = crate::tui::run(
        config,
        crate::tui::Options {
            theme: args.theme,
            dir: args.dir,
            themes_dir: "themes".into(),
            schedules: args.schedules,
            store: shared,
        },
    )
    .map_err(|message| Failure { code: 1, message })?;
    // Ctrl-C: interrupted (runs in flight were handed over, as the contract's exit 3 says).
    Ok(if interrupted {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}
