fn main() {
    println!("omniflow");
}
