//! The kernel-profile and backend switches as a user meets them: the built
//! binary with `--kernels` / `--backend` and `WGLLM_KERNELS` /
//! `WGLLM_BACKEND`, their precedence, their errors, and what `devices` and
//! `verify` report. Parity under each setting is tests/parity.rs's job (CI
//! runs it under each); this file checks that the switches reach the device.

mod common;

use std::process::Output;

use common::{fixture, text};

/// The binary with the switches this file tests cleared first.
fn wgllm(env: &[(&str, &str)], args: &[&str]) -> Output {
    let cleared = [
        "WGLLM_KERNELS",
        "WGLLM_BACKEND",
        "WGLLM_ADAPTER",
        "WGPU_BACKEND",
    ];
    common::wgllm_output(&cleared, env, args)
}

/// The `kernels:` line of the selected adapter in `wgllm devices`.
fn selected_kernels(out: &Output) -> String {
    let s = text(&out.stdout);
    let block: Vec<&str> = s
        .lines()
        .skip_while(|l| !l.contains("(selected)"))
        .take_while(|l| l.starts_with("    ") || l.contains("(selected)"))
        .collect();
    block
        .iter()
        .find_map(|l| l.trim().strip_prefix("kernels: "))
        .unwrap_or_else(|| panic!("no kernels line for the selected adapter:\n{s}"))
        .to_string()
}

#[test]
fn devices_reports_the_profile_and_its_source() {
    let auto = wgllm(&[], &["devices"]);
    assert!(auto.status.success(), "{}", text(&auto.stderr));
    let k = selected_kernels(&auto);
    assert!(k.contains("(auto: "), "{k}");

    let env = wgllm(&[("WGLLM_KERNELS", "gpu")], &["devices"]);
    assert!(env.status.success(), "{}", text(&env.stderr));
    assert_eq!(selected_kernels(&env), "gpu (forced by WGLLM_KERNELS)");

    // the flag wins over the variable
    let flag = wgllm(
        &[("WGLLM_KERNELS", "gpu")],
        &["--kernels", "cpu", "devices"],
    );
    assert!(flag.status.success(), "{}", text(&flag.stderr));
    assert_eq!(selected_kernels(&flag), "cpu (forced)");

    let json = wgllm(&[("WGLLM_KERNELS", "cpu")], &["devices", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).expect("devices --json");
    for d in v.as_array().unwrap() {
        assert_eq!(d["kernels"], "cpu", "{d}");
    }
}

#[test]
fn bad_values_name_the_variable_or_flag_and_the_choices() {
    let e = wgllm(&[("WGLLM_KERNELS", "fast")], &["devices"]);
    assert_eq!(e.status.code(), Some(2));
    let s = text(&e.stderr);
    assert!(
        s.contains("WGLLM_KERNELS") && s.contains("auto, gpu or cpu"),
        "{s}"
    );

    let e = wgllm(&[], &["--kernels", "fast", "devices"]);
    assert_eq!(e.status.code(), Some(2));
    let s = text(&e.stderr);
    assert!(
        s.contains("--kernels") && s.contains("auto, gpu or cpu"),
        "{s}"
    );

    let e = wgllm(&[("WGLLM_BACKEND", "webgl")], &["devices"]);
    assert_eq!(e.status.code(), Some(2));
    let s = text(&e.stderr);
    assert!(
        s.contains("WGLLM_BACKEND") && s.contains("vulkan, metal, dx12, gl"),
        "{s}"
    );

    let e = wgllm(&[], &["--backend", "vulkan,webgl", "devices"]);
    assert_eq!(e.status.code(), Some(2));
    let s = text(&e.stderr);
    assert!(s.contains("--backend") && s.contains("'webgl'"), "{s}");
}

#[test]
fn backend_choice_restricts_the_adapters() {
    // Every adapter listed is on the asked-for backend (GL: llvmpipe through
    // EGL on the test machines; tools/setup.sh installs it).
    for (value, backend) in [("gl", "Gl"), ("vulkan", "Vulkan")] {
        let out = wgllm(&[("WGLLM_BACKEND", value)], &["devices", "--json"]);
        assert!(out.status.success(), "{value}: {}", text(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let all = v.as_array().unwrap();
        assert!(!all.is_empty(), "{value}: no adapters");
        for d in all {
            assert_eq!(d["backend"], backend, "{value}: {d}");
        }
        assert_eq!(all.iter().filter(|d| d["default"] == true).count(), 1);
    }
}

/// An adapter selection matching nothing is an error (exit 2, the reason
/// and what exists), from the flag and from the variable, in text and JSON;
/// the list is still printed so the user can pick. It used to exit 0 with
/// no adapter marked selected, so a script took the selection as fine.
#[test]
fn devices_fails_when_the_adapter_selection_matches_nothing() {
    for (env, args) in [
        (&[][..], &["--adapter", "no-such", "devices"][..]),
        (&[("WGLLM_ADAPTER", "no-such")][..], &["devices"][..]),
        (&[][..], &["--adapter", "no-such", "devices", "--json"][..]),
        (&[][..], &["--adapter", "99", "devices"][..]),
    ] {
        let out = wgllm(env, args);
        let s = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{env:?} {args:?}: {s}");
        assert!(
            s.contains("no adapter name contains 'no-such'")
                || s.contains("adapter index 99 out of range"),
            "{env:?} {args:?}: {s}"
        );
        assert!(s.contains("available: "), "{env:?} {args:?}: {s}");
        let listed = text(&out.stdout);
        assert!(!listed.is_empty(), "{args:?}: nothing listed");
        assert!(!listed.contains("(selected)"), "{args:?}: {listed}");
        if args.contains(&"--json") {
            let v: serde_json::Value = serde_json::from_str(&listed).unwrap();
            assert!(v.as_array().unwrap().iter().all(|d| d["default"] == false));
        }
    }
}

#[test]
fn verify_says_which_backend_and_profile_ran_and_passes_on_each() {
    let dir = fixture("qwen2_bias_tied");
    let reference = dir.join("reference_f32.safetensors");
    for (backend, kernels, want_backend) in [
        ("vulkan", "gpu", "Vulkan"),
        ("gl", "cpu", "Gl"),
        ("gl", "gpu", "Gl"),
    ] {
        let out = wgllm(
            &[],
            &[
                "--backend",
                backend,
                "--kernels",
                kernels,
                "verify",
                "--model",
                dir.to_str().unwrap(),
                "--reference",
                reference.to_str().unwrap(),
                "--json",
            ],
        );
        let what = format!("{backend}/{kernels}");
        assert_eq!(out.status.code(), Some(0), "{what}: {}", text(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["backend"], want_backend, "{what}");
        assert!(
            v["kernels"].as_str().unwrap().starts_with(kernels),
            "{what}: {}",
            v["kernels"]
        );
        assert_eq!(v["pass"], true, "{what}");
    }
}

/// Mesa's device-select layer printed "XDG_RUNTIME_DIR is invalid or not
/// set" twice per Vulkan instance on headless machines; wgllm turns the
/// layer off there (see gpu.rs).
#[test]
fn no_wayland_noise_on_a_headless_machine() {
    let cleared = [
        "XDG_RUNTIME_DIR",
        "NODEVICE_SELECT",
        "WGLLM_BACKEND",
        "WGPU_BACKEND",
    ];
    let out = common::wgllm_output(&cleared, &[], &["devices"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = text(&out.stderr);
    assert!(!s.contains("XDG_RUNTIME_DIR"), "{s}");
}
