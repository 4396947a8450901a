#[path = "llama/gguf.rs"]
mod gguf;

#[test]
fn write_model() {
    if let Ok(p) = std::env::var("WRITE_GGUF") {
        gguf::write(std::path::Path::new(&p)).unwrap();
    }
}
