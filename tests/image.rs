//! The deployment image, built from the Dockerfile by podman with no registry
//! (scripts/image-local.sh: Debian bases from mmdebstrap) and run the way an SDL service runs it:
//! as its non-root user, with CPU and memory limits, here with no network at all.

mod common;

use std::path::Path;
use std::process::Command;

use skytrain::train::checkpoint;

const TAG: &str = "localhost/skytrain-test:cpu";

fn podman() -> Command {
    let mut cmd = Command::new("podman");
    cmd.env("CONTAINERS_CONF", Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/containers.conf"));
    cmd
}

/// Builds the image once for every test here.
fn image() -> &'static str {
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        common::ok(Command::new(root.join("scripts/image-local.sh")).arg(TAG).output().unwrap(), "image-local.sh");
    });
    TAG
}

#[test]
fn the_image_builds_runs_as_its_user_and_trains_like_the_host() {
    image();

    let run = |args: &[&str]| {
        let mut cmd = podman();
        cmd.args(["run", "--rm", "--network", "none", "--cpus", "2", "--memory", "3g"]).args(args);
        common::ok(cmd.output().unwrap(), &format!("podman run {args:?}"))
    };
    // Non-root, everything the binary loads is inside the image, CA certificates for HTTPS stores.
    assert_eq!(run(&[TAG, "id", "-u"]).trim(), "10001");
    let ldd = run(&[TAG, "ldd", "/opt/skytrain/bin/skytrain"]);
    assert!(!ldd.contains("not found"), "{ldd}");
    assert!(ldd.contains("/opt/skytrain/bin/../torch/lib/libtorch_cpu.so"), "{ldd}");
    run(&[TAG, "test", "-s", "/etc/ssl/certs/ca-certificates.crt"]);

    // The same small run trained on the host and in the container ends in the same bytes.
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("host");
    let boxed = dir.path().join("boxed");
    common::small_run(&host, 4, 4);
    common::small_run(&boxed, 4, 4);
    common::ok(common::bin().args(["train", "--store", host.to_str().unwrap()]).output().unwrap(), "host train");
    let mode: std::fs::Permissions = std::os::unix::fs::PermissionsExt::from_mode(0o777);
    for entry in walk(dir.path()) {
        std::fs::set_permissions(&entry, mode.clone()).unwrap();
    }
    let volume = format!("{}:/data", boxed.display());
    run(&["-v", &volume, TAG, "skytrain", "train", "--store", "/data"]);
    let boxed_store = skytrain::store::Store::open(boxed.to_str().unwrap()).unwrap();
    let host_store = skytrain::store::Store::open(host.to_str().unwrap()).unwrap();
    assert_eq!(checkpoint::list(&boxed_store).unwrap(), vec![4]);
    for file in ["model.safetensors", "ema.safetensors"] {
        assert!(
            checkpoint::read_file(&boxed_store, 4, file).unwrap()
                == checkpoint::read_file(&host_store, 4, file).unwrap(),
            "{file} differs between the container and the host"
        );
    }
    let size =
        common::ok(podman().args(["image", "inspect", "--format", "{{.Size}}", TAG]).output().unwrap(), "inspect");
    eprintln!("image {TAG}: {} MB", size.trim().parse::<f64>().unwrap() / 1e6);
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// `deploy rehearse` on a generated 3-worker SDL: every service a container from the image in its
/// own "provider" namespace; worker-1's lease ends (SIGTERM), worker-2 is SIGKILLed and restarted,
/// worker-3's provider is lost and replaced; the run completes and is sampled and exported.
#[test]
fn a_rehearsed_deployment_survives_lost_leases_and_is_sampled_and_exported() {
    image();
    let dir = tempfile::tempdir().unwrap();
    let names = ["w1", "w2", "w3"];
    let (_, spec, keys) = common::diloco_run(dir.path(), 6, 10, &names, |s| {
        s.name = "rehearsal".into();
        s.sync.round_deadline_s = 120.0;
        s.sync.heartbeat_timeout_s = 10.0;
        s.sync.min_members = 1;
        s.sync.quorum = 1;
    });
    let spec_file = dir.path().join("run.toml");
    std::fs::write(&spec_file, spec.to_toml()).unwrap();
    let plan = dir.path().join("deploy.toml");
    std::fs::write(
        &plan,
        format!(
            r#"image = "{TAG}"
workers = 3
[worker]
cpu = 1
memory = "3Gi"
storage = "10Gi"
gpu_units = 1
gpu = [{{ model = "h100" }}]
price = {{ denom = "usdc", amount = 3400 }}
[coordinator]
cpu = 0.5
memory = "1Gi"
storage = "1Gi"
price = {{ denom = "uakt", amount = 100 }}
"#
        ),
    )
    .unwrap();
    let sdl = dir.path().join("deploy.yaml");
    let mut cmd = common::bin();
    cmd.args(["deploy", "sdl", "--spec", spec_file.to_str().unwrap(), "--plan", plan.to_str().unwrap()])
        .args(["--store", "s3://rehearsal/runs/r1", "--out", sdl.to_str().unwrap(), "--keys"])
        .args(&keys)
        .env("AWS_ACCESS_KEY_ID", "rehearsal-key")
        .env("AWS_SECRET_ACCESS_KEY", "rehearsal-secret")
        .env("AWS_REGION", "us-east-1");
    common::ok(cmd.output().unwrap(), "deploy sdl");
    let out_dir = dir.path().join("rehearsal");
    let out = common::bin()
        .args(["deploy", "rehearse", "--sdl", sdl.to_str().unwrap(), "--run"])
        .arg(dir.path().join("store"))
        .args(["--out", out_dir.to_str().unwrap(), "--limit-s", "900", "--rate", "50mbit"])
        .env("CONTAINERS_CONF", Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/containers.conf"))
        .args(["--weed", common::torch_venv().join("bin/weed").to_str().unwrap()])
        .output()
        .unwrap();
    let said = common::ok(out, "deploy rehearse");
    eprintln!("{said}");
    for needle in [
        "worker-1's lease ended: SIGTERM",
        "worker-2 SIGKILLed",
        "worker-3's provider lost",
        "run complete",
        "rounds: 6",
        "lease sessions",
    ] {
        assert!(said.contains(needle), "rehearsal output lacks `{needle}`:\n{said}");
    }
    assert!(out_dir.join("samples.png").exists());
    assert!(out_dir.join("model/model.safetensors").exists());
    // Nothing of the rehearsal is left behind: no namespaces, no containers.
    let netns = common::ok(Command::new("ip").args(["netns", "list"]).output().unwrap(), "ip netns");
    assert!(!netns.contains("-wan"), "namespaces left: {netns}");
}
