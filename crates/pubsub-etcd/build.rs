fn main() -> std::io::Result<()> {
    println!("cargo:rerun-if-changed=proto/record.proto");
    prost_build::Config::new()
        // Payloads decode as slices of the etcd response buffer, not copies.
        .bytes(["."])
        .compile_protos(&["proto/record.proto"], &["proto"])
}
