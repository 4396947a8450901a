//! The library call as an embedder uses it: `call_hugging_face_model` reads the process's
//! environment once, into a process-wide cell. So this binary holds one test: a second one
//! would get whichever configuration the first call loaded.

use omniflow::providers::{call_hugging_face_model, Request};

/// A configuration that cannot load is an answer, not a panic: `success: false`, and an
/// error naming the variable and where to fix it.
#[tokio::test]
async fn a_bad_environment_is_answered_with_what_to_fix() {
    // Only the bad setting: another variable the shell carries cannot be the one named.
    for (k, _) in std::env::vars_os() {
        std::env::remove_var(k);
    }
    std::env::set_var("REQUEST_TIMEOUT", "soon");
    let r = call_hugging_face_model(Request::new("Say something.")).await;
    assert!(!r.success);
    assert_eq!(r.output, None);
    let error = r.error.expect("the failure is said");
    assert!(error.contains("REQUEST_TIMEOUT"), "{error}");
    assert!(error.contains("soon"), "{error}");
    assert!(
        error.ends_with("(check your environment or .env)"),
        "{error}"
    );
    assert!(!r.model.is_empty(), "the model asked for is named");
}
