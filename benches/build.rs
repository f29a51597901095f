//! Compiles the etcd KV subset (proto/etcdserverpb/kv.proto) with protox, so
//! the etcd peer is driven over its own gRPC API without a system protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let file = "etcdserverpb/kv.proto";
    println!("cargo:rerun-if-changed=proto/{file}");
    let descriptors = protox::compile([file], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(descriptors)?;
    Ok(())
}
