//! `coreflect-target`: runs the test target (see the library docs for its protocol).

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match coreflect_target::TargetOptions::parse(&args) {
        Ok(o) => coreflect_target::run(o),
        Err(e) => {
            eprintln!("coreflect-target: {e}");
            std::process::exit(2);
        }
    }
}
