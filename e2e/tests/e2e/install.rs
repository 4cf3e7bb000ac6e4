//! Issue 7's "done when": `helm install` and `kubectl apply -k config/default` against the
//! end-to-end API server, with the operator Deployment coming up (kwok runs its pod).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context as _, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams};

use super::harness::{World, kubeconfig, repo_root, wait_for, wait_gone};

fn tools() -> anyhow::Result<PathBuf> {
    let out = Command::new("bash")
        .arg(repo_root().join("e2e/scripts/build-control-plane.sh"))
        .output()
        .context("failed to run build-control-plane.sh")?;
    ensure!(out.status.success(), "build-control-plane.sh failed");
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

fn run(bin: PathBuf, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(&bin)
        .args(args)
        .current_dir(repo_root())
        .env("KUBECONFIG", kubeconfig())
        .output()
        .with_context(|| format!("failed to run {}", bin.display()))?;
    ensure!(
        out.status.success(),
        "{} {args:?} failed: {}",
        bin.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn available(d: &Deployment) -> bool {
    d.status.as_ref().and_then(|s| s.available_replicas) == Some(1)
}

#[tokio::test]
async fn helm_install_and_kubectl_apply_k_bring_the_operator_up() -> anyhow::Result<()> {
    let w = World::new("install").await?;
    let bin = tools()?;

    run(
        bin.join("helm"),
        &[
            "install",
            "semantis",
            "charts/semantis-operator",
            "--namespace",
            &w.ns,
            "--set",
            "monitoring.dashboard.enabled=true",
            // The harness manages the CRD here (the chart's own is tested on the real node).
            "--set",
            "crds.install=false",
        ],
    )?;
    wait_for(
        &w.api::<Deployment>(),
        "semantis",
        "the chart's operator available",
        available,
    )
    .await?;
    let listed = run(bin.join("helm"), &["list", "--namespace", &w.ns, "--short"])?;
    assert_eq!(listed.trim(), "semantis");
    run(
        bin.join("helm"),
        &["uninstall", "semantis", "--namespace", &w.ns, "--wait"],
    )?;
    wait_gone(&w.api::<Deployment>(), "semantis").await?;

    run(
        bin.join("kubectl"),
        &[
            "apply",
            "--server-side",
            "--force-conflicts",
            "-k",
            "config/default",
        ],
    )?;
    let system: Api<Deployment> = Api::namespaced(w.client.clone(), "semantis-system");
    wait_for(
        &system,
        "semantis-operator",
        "the kustomize operator available",
        available,
    )
    .await?;
    // Clean up everything but the CRD, which the other tests share.
    let namespaces: Api<Namespace> = Api::all(w.client.clone());
    namespaces
        .delete("semantis-system", &DeleteParams::background())
        .await?;
    run(
        bin.join("kubectl"),
        &[
            "delete",
            "clusterrole/semantis-operator",
            "clusterrolebinding/semantis-operator",
        ],
    )?;
    super::harness::delete_namespace(&w.client, &w.ns).await;
    Ok(())
}
