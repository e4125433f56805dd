//! The shader decisions and the autotuner (`wgllm::tune`): the decisions'
//! text form and errors, the tune cache (round trip, key, bad files), that
//! cached choices reach the ops, that tuned mixes still pass `verify`
//! against PyTorch on a fixture, and `wgllm tune` / `--tune auto` as a user
//! runs them. Timings are printed by the tuner but never asserted.

mod common;

use std::process::Output;

use common::{fixture, text};

use wgllm::gpu::{
    AttentionKernel, DecisionKey, Decisions, Gpu, GpuOptions, KernelChoice, KernelProfile,
    LinearVariant, PrefillKernel, TuneMode, WeightLayout,
};
use wgllm::tensor::WDType;
use wgllm::tune::{self, AdapterKey, Cache, Entry, ModelShapes};

fn shapes() -> ModelShapes {
    let cfg = wgllm::config::ModelConfig::from_file(fixture("qwen2_bias_tied").join("config.json"))
        .unwrap();
    ModelShapes::from_config(&cfg, WDType::Bf16)
}

/// A fresh device with no forced decisions (whatever the environment says).
fn gpu() -> Gpu {
    Gpu::new(&GpuOptions {
        decisions: Some(Decisions::default()),
        ..Default::default()
    })
    .unwrap()
}

fn entry(a: &AdapterKey, kernel: &str, shape: &str, choice: &str) -> Entry {
    Entry {
        adapter: a.adapter.clone(),
        backend: a.backend.clone(),
        driver: a.driver.clone(),
        driver_info: a.driver_info.clone(),
        kernel: kernel.into(),
        shape: shape.into(),
        choice: choice.into(),
        candidates: vec![(choice.into(), Some(1.0))],
        clock: "wall clock".into(),
    }
}

#[test]
fn decisions_parse_print_and_name_bad_values() {
    let d: Decisions =
        "gemv=rows, gemv_rows_wg=128,attention=workgroup,attn_splits=8,argmax_wg=512"
            .parse()
            .unwrap();
    assert_eq!(d.gemv, Some(LinearVariant::RowPerThread));
    assert_eq!(d.gemv_rows_wg, Some(128));
    assert_eq!(d.attention, Some(AttentionKernel::Workgroup));
    assert_eq!(d.attn_splits, Some(8));
    assert_eq!(d.argmax_wg, Some(512));
    assert_eq!(d.prefill, None);
    // Display is the same syntax, and round-trips.
    assert_eq!(d.to_string().parse::<Decisions>().unwrap(), d);
    assert_eq!("".parse::<Decisions>().unwrap(), Decisions::default());
    let all = "gemv=wg_shared,prefill=tiled,prefill_tile=16,attention=rows,attn_min_split=64";
    let d: Decisions = all.parse().unwrap();
    assert_eq!(d.prefill, Some(PrefillKernel::Tiled));
    assert_eq!(d.to_string(), all);

    for (bad, want) in [
        ("gemv=fast", "rows, wg_subgroup or wg_shared"),
        ("gemv_rows_wg=48", "8, 16, 32, 64, 128 or 256"),
        ("argmax_wg=100", "power of two"),
        ("attn_splits=0", "1..=64"),
        ("prefill_tile=128", "16, 32 or 64"),
        ("tile=16", "gemv, gemv_rows_wg"),
        ("gemv", "key=value"),
    ] {
        let e = bad.parse::<Decisions>().unwrap_err();
        assert!(e.contains(want), "{bad}: {e}");
    }
    // Every key has a name that parses back to it.
    for k in DecisionKey::ALL {
        assert_eq!(k.name().parse::<DecisionKey>(), Ok(k));
    }
    assert_eq!("AUTO".parse::<TuneMode>(), Ok(TuneMode::Auto));
    assert!("sometimes"
        .parse::<TuneMode>()
        .unwrap_err()
        .contains("off, cache or auto"));
}

#[test]
fn cache_round_trips_and_a_different_driver_misses() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/tune.json");
    let a = AdapterKey {
        adapter: "llvmpipe (LLVM 15.0.6, 256 bits)".into(),
        backend: "Vulkan".into(),
        driver: "llvmpipe".into(),
        driver_info: "Mesa 22.3.6 (LLVM 15.0.6)".into(),
    };
    let mut c = Cache::default();
    c.put(entry(&a, "gemv", "bf16 k", "gemv=rows,gemv_rows_wg=128"));
    c.put(entry(&a, "argmax", "vocab 96", "argmax_wg=128"));
    // Same key again: replaced, not added.
    c.put(entry(&a, "argmax", "vocab 96", "argmax_wg=256"));
    c.save(&path).unwrap();
    let (back, warn) = Cache::load(&path);
    assert_eq!(warn, None);
    assert_eq!(back.entries, c.entries);
    assert_eq!(back.entries.len(), 2);
    assert_eq!(
        back.find(&a, "argmax", "vocab 96").unwrap().choice,
        "argmax_wg=256"
    );
    // Every part of the key counts.
    let other_driver = AdapterKey {
        driver_info: "Mesa 24.0.0 (LLVM 17.0.6)".into(),
        ..a.clone()
    };
    assert!(back.find(&other_driver, "argmax", "vocab 96").is_none());
    let other_backend = AdapterKey {
        backend: "Gl".into(),
        ..a.clone()
    };
    assert!(back.find(&other_backend, "argmax", "vocab 96").is_none());
    assert!(back.find(&a, "argmax", "vocab 97").is_none());
    assert!(back.find(&a, "gemv", "vocab 96").is_none());
    // A missing file is an empty cache, no warning.
    let (empty, warn) = Cache::load(&dir.path().join("none.json"));
    assert!(empty.entries.is_empty() && warn.is_none());
}

#[test]
fn bad_cache_files_are_warnings_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    for (name, text, want) in [
        ("garbage.json", "{ not json", "not a tune cache"),
        ("array.json", "[1, 2, 3]", "not a tune cache"),
        (
            "foreign.json",
            r#"{"format": "someone-else-7", "entries": []}"#,
            "format",
        ),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let (c, warn) = Cache::load(&path);
        assert!(c.entries.is_empty(), "{name}");
        let w = warn.unwrap_or_else(|| panic!("{name}: no warning"));
        assert!(w.contains(name) && w.contains(want), "{name}: {w}");
    }

    // An entry for this adapter whose choice is not one of its candidates
    // or sets another kernel's decisions is ignored with a warning; the
    // profile's choice stays.
    let mut g = gpu();
    let s = shapes();
    let a = AdapterKey::of(&g);
    let path = dir.path().join("entries.json");
    let mut c = Cache::default();
    c.put(entry(&a, "argmax", &s.key("argmax"), "argmax_wg=2048"));
    c.put(entry(&a, "gemv", &s.key("gemv"), "attn_splits=4"));
    c.put(entry(&a, "prefill", &s.key("prefill"), "prefill=rows"));
    c.save(&path).unwrap();
    // (argmax_wg=2048 is out of range: the whole choice does not parse.)
    let r = tune::prepare_with(&mut g, &s, TuneMode::Cache, false, &path).unwrap();
    let w = r.warnings.join("\n");
    assert!(w.contains("argmax entry") && w.contains("argmax_wg"), "{w}");
    assert!(
        w.contains("gemv entry") && w.contains("not a gemv decision"),
        "{w}"
    );
    assert!(w.contains("entries.json"), "{w}");
    assert_eq!(g.caps.decisions.argmax_wg, None);
    assert_eq!(g.caps.decisions.attn_splits, None);
    // The good entry was applied.
    assert_eq!(g.caps.decisions.prefill, Some(PrefillKernel::RowBlocks));
    assert_eq!(g.decision_source(DecisionKey::Prefill), "cache");
}

/// Cached choices reach the ops built afterwards, visible through their
/// accessors; `off` ignores the cache; options and WGLLM_DECISIONS win
/// over it.
#[test]
fn cached_choices_are_used_by_the_ops() {
    let s = shapes();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tune.json");
    let probe = gpu();
    let a = AdapterKey::of(&probe);
    // Choices that differ from both profiles' defaults (but weights: a
    // tiled prefill reads buffers only).
    let mut c = Cache::default();
    c.put(entry(&a, "weights", &s.key("weights"), "weights=buffer"));
    c.put(entry(
        &a,
        "gemv",
        &s.key("gemv"),
        "gemv=rows,gemv_rows_wg=32",
    ));
    c.put(entry(
        &a,
        "prefill",
        &s.key("prefill"),
        "prefill=tiled,prefill_tile=16",
    ));
    c.put(entry(
        &a,
        "attention",
        &s.key("attention"),
        "attention=rows,attn_splits=16,attn_min_split=64",
    ));
    c.put(entry(&a, "argmax", &s.key("argmax"), "argmax_wg=128"));
    c.save(&path).unwrap();
    drop(probe);

    let mut g = gpu();
    let r = tune::prepare_with(&mut g, &s, TuneMode::Cache, false, &path).unwrap();
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    assert!(r.kernels.iter().all(|k| k.source == "cache"), "{r:?}");
    let lin = wgllm::ops::matmul::Linear::new(&g, WDType::Bf16, false).unwrap();
    assert_eq!(lin.variant(), LinearVariant::RowPerThread);
    assert_eq!(lin.prefill(), PrefillKernel::Tiled);
    assert_eq!(lin.tile().bm, 16);
    assert_eq!(LinearVariant::RowPerThread.workgroup(&g.caps), 32);
    let att = wgllm::ops::attention::Attention::new(&g, s.head_dim).unwrap();
    assert!(att.shape.rows);
    assert_eq!((att.shape.splits, att.shape.min_split), (16, 64));
    assert_eq!(wgllm::ops::argmax::Argmax::new(&g).unwrap().wg, 128);
    let desc = tune::describe(&g).join("\n");
    assert!(
        desc.contains("gemv: gemv=rows,gemv_rows_wg=32 (cache)"),
        "{desc}"
    );
    assert!(desc.contains("argmax: argmax_wg=128 (cache)"), "{desc}");
    assert!(desc.contains("weights: weights=buffer (cache)"), "{desc}");

    // off: the cache is not read.
    let mut off = gpu();
    tune::prepare_with(&mut off, &s, TuneMode::Off, false, &path).unwrap();
    assert_eq!(off.caps.decisions, Decisions::default());
    assert_eq!(off.decision_source(DecisionKey::ArgmaxWg), "profile");

    // A decision forced by options stays forced; the others come from the
    // cache.
    let mut forced = Gpu::new(&GpuOptions {
        decisions: Some("argmax_wg=256".parse().unwrap()),
        ..Default::default()
    })
    .unwrap();
    tune::prepare_with(&mut forced, &s, TuneMode::Cache, false, &path).unwrap();
    assert_eq!(forced.caps.decisions.argmax_wg, Some(256));
    assert_eq!(
        forced.decision_source(DecisionKey::ArgmaxWg),
        "GpuOptions::decisions"
    );
    assert_eq!(forced.caps.decisions.attn_min_split, Some(64));
}

/// A tuning run times every candidate (each either timed or failed with a
/// reason), applies the fastest and writes it to the cache; a second load
/// in cache mode reads it without timing.
#[test]
fn tuning_run_writes_a_cache_the_next_load_reads() {
    let s = shapes();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tune.json");
    let mut g = gpu();
    let r = tune::prepare_with(&mut g, &s, TuneMode::Auto, false, &path).unwrap();
    let report = tune::format_report(&r);
    print!("{report}");
    assert!(
        report.contains("<- chosen") && report.contains("choice: "),
        "{report}"
    );
    assert_eq!(r.kernels.len(), tune::KERNELS.len());
    for k in &r.kernels {
        assert_eq!(k.source, "tuner");
        // (weights has one candidate, buffer, where the device's kernels
        // cannot read textures: the GPU profile's tiled prefill.)
        let least = if k.kernel == "weights" && g.caps.kernels == KernelProfile::Gpu {
            1
        } else {
            2
        };
        assert!(
            k.candidates.len() >= least,
            "{}: {:?}",
            k.kernel,
            k.candidates
        );
        // The profile's default is always a candidate, and it runs here.
        let first = &k.candidates[0];
        assert!(first.1.is_ok(), "{}: {:?}", k.kernel, first);
        assert!(
            k.candidates
                .iter()
                .any(|(d, t)| *d == k.choice && t.is_ok()),
            "{}: the choice is a timed candidate",
            k.kernel
        );
        for key in tune::kernel_keys(k.kernel) {
            if let Some(v) = k.choice.get(*key) {
                assert_eq!(g.caps.decisions.get(*key), Some(v));
                assert_eq!(g.decision_source(*key), "tuner");
            }
        }
    }
    let (c, warn) = Cache::load(&path);
    assert!(warn.is_none());
    assert_eq!(c.entries.len(), tune::KERNELS.len());

    let mut again = gpu();
    let r2 = tune::prepare_with(&mut again, &s, TuneMode::Auto, false, &path).unwrap();
    assert!(r2
        .kernels
        .iter()
        .all(|k| k.source == "cache" && k.candidates.is_empty()));
    assert_eq!(again.caps.decisions, g.caps.decisions);
}

/// A device with `profile` forced and `decisions` (options: they stay
/// forced) or none.
fn gpu_with(profile: KernelProfile, decisions: &str) -> Gpu {
    Gpu::new(&GpuOptions {
        kernels: Some(KernelChoice::Force(profile)),
        decisions: Some(decisions.parse().unwrap()),
        ..Default::default()
    })
    .unwrap()
}

/// A linear fixture's weights are in the layout the device's decisions
/// give the model's (the CPU profile's textures, not always buffers), and
/// each tuned candidate is timed on the layout its own decisions give: a
/// tiled prefill without a weights decision on buffers, and not at all
/// (a failed candidate saying why) under weights=texture.
#[test]
fn linear_fixtures_use_the_layout_the_decisions_give() {
    let s = shapes();
    for (decisions, want) in [
        ("", WeightLayout::Texture),
        ("weights=buffer", WeightLayout::Buffer),
        ("prefill=tiled", WeightLayout::Buffer),
        ("weights=texture,prefill=rows", WeightLayout::Texture),
    ] {
        let g = gpu_with(KernelProfile::CpuDevice, decisions);
        for tokens in [1, tune::PREFILL_TOKENS] {
            let f = tune::LinearFixture::new(&g, &s, tokens).unwrap();
            assert_eq!(f.layout(), want, "{decisions:?}");
            let l = f.weight_layouts();
            // Every linear of the fixture has k % 8 == 0 (64, 160).
            assert!(
                !l.is_empty() && l.iter().all(|x| *x == want),
                "{decisions:?}: {l:?}"
            );
        }
    }
    // The GPU profile keeps buffers.
    let g = gpu_with(KernelProfile::Gpu, "");
    let f = tune::LinearFixture::new(&g, &s, 1).unwrap();
    assert!(f
        .weight_layouts()
        .iter()
        .all(|x| *x == WeightLayout::Buffer));

    let mut g = gpu_with(KernelProfile::CpuDevice, "");
    let r = tune::tune_kernel(&mut g, "prefill", &s);
    let mut tiled = 0;
    for (d, t) in &r.candidates {
        let (_, l) = r.layouts.iter().find(|(c, _)| c == d).expect("timed");
        let want = if d.prefill == Some(PrefillKernel::Tiled) {
            tiled += 1;
            WeightLayout::Buffer
        } else {
            WeightLayout::Texture
        };
        assert_eq!(*l, want, "{d}");
        assert!(t.is_ok(), "{d}: {t:?}");
    }
    assert!(tiled > 0, "{:?}", r.candidates);

    // With weights=texture decided (a tuner's choice), the tiled candidates
    // are not run and say why; the row-block ones run on textures.
    g.set_decisions(&"weights=texture".parse().unwrap(), "tuner");
    let r = tune::tune_kernel(&mut g, "prefill", &s);
    for (d, t) in &r.candidates {
        if d.prefill == Some(PrefillKernel::Tiled) {
            let e = t.as_ref().unwrap_err();
            assert!(
                e.contains("not run")
                    && e.contains("weights=texture (tuner)")
                    && e.contains("prefill=tiled (candidate)")
                    && e.contains("buffers only"),
                "{d}: {e}"
            );
        } else {
            assert!(t.is_ok(), "{d}: {t:?}");
            assert!(r.layouts.contains(&(*d, WeightLayout::Texture)), "{d}");
        }
    }
    assert_ne!(r.choice.prefill, Some(PrefillKernel::Tiled));
}

/// The `weights` kernel: buffer and texture where the profile's kernels
/// read textures (the CPU profile; the GPU profile only with prefill=rows,
/// its tiled prefill reads buffers only), the current choice first; each
/// candidate timed on weights in its own layout; f32 weights never take
/// textures, so that candidate fails saying so.
#[test]
fn weights_kernel_candidates_per_profile() {
    let s = shapes();
    let w = |l: &str| -> Decisions { format!("weights={l}").parse().unwrap() };
    assert_eq!(tune::KERNELS[0], "weights");
    assert_eq!(tune::kernel_keys("weights"), &[DecisionKey::Weights]);
    for (profile, decisions, want) in [
        (
            KernelProfile::CpuDevice,
            "",
            vec![w("texture"), w("buffer")],
        ),
        (
            KernelProfile::CpuDevice,
            "weights=buffer",
            vec![w("buffer"), w("texture")],
        ),
        (KernelProfile::CpuDevice, "prefill=tiled", vec![w("buffer")]),
        (KernelProfile::Gpu, "", vec![w("buffer")]),
        (
            KernelProfile::Gpu,
            "prefill=rows",
            vec![w("buffer"), w("texture")],
        ),
    ] {
        let mut g = gpu_with(profile, decisions);
        assert_eq!(
            tune::candidates(&g, "weights"),
            want,
            "{profile:?} {decisions:?}"
        );
        if want.len() < 2 {
            continue;
        }
        let r = tune::tune_kernel(&mut g, "weights", &s);
        print!("{}", tune::format_kernel(&r));
        for (d, t) in &r.candidates {
            assert!(t.is_ok(), "{profile:?} {decisions:?} {d}: {t:?}");
            assert!(
                r.layouts.contains(&(*d, d.weights.unwrap())),
                "{profile:?} {d}: {:?}",
                r.layouts
            );
        }
        assert!(want.contains(&r.choice));
    }
    let f32_shapes = ModelShapes {
        wdtype: WDType::F32,
        ..shapes()
    };
    let mut g = gpu_with(KernelProfile::CpuDevice, "");
    let r = tune::tune_kernel(&mut g, "weights", &f32_shapes);
    let (_, t) = r
        .candidates
        .iter()
        .find(|(d, _)| *d == w("texture"))
        .unwrap();
    assert!(t.as_ref().unwrap_err().contains("texture layout"), "{t:?}");
    assert_eq!(r.choice, w("buffer"));
}

/// Model load options for a fixture as bf16 (the texture layout holds bf16
/// only).
fn bf16_opts() -> wgllm::model::ModelOptions {
    wgllm::model::ModelOptions {
        max_context: Some(32),
        dtype: wgllm::loader::LoadDType::Bf16,
        ..Default::default()
    }
}

/// Every dense 2D weight of `m` (the embedding, each layer's linears).
fn layouts_of(m: &wgllm::model::Model) -> Vec<WeightLayout> {
    let w = &m.weights;
    let mut v = vec![w.embed.dense().unwrap().layout()];
    for l in &w.layers {
        for t in [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down] {
            v.push(t.dense().unwrap().layout());
        }
    }
    v
}

/// A cached weights choice is applied at load and the model's tensors
/// follow it; `describe` (bench's `variant` lines) says so.
#[test]
fn cached_weights_choice_reaches_the_model() {
    let s = shapes();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tune.json");
    // The CPU profile's default is texture: buffer shows the cache won, and
    // texture that a cached texture is honoured.
    for layout in [WeightLayout::Buffer, WeightLayout::Texture] {
        let name = wgllm::gpu::weights_name(layout);
        let mut g = gpu_with(KernelProfile::CpuDevice, "");
        let mut c = Cache::default();
        c.put(entry(
            &AdapterKey::of(&g),
            "weights",
            &s.key("weights"),
            &format!("weights={name}"),
        ));
        c.save(&path).unwrap();
        let r = tune::prepare_with(&mut g, &s, TuneMode::Cache, false, &path).unwrap();
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        assert_eq!(g.caps.decisions.weights, Some(layout));
        let desc = tune::describe(&g);
        assert_eq!(
            desc[0],
            format!("weights: weights={name} (cache)"),
            "{desc:?}"
        );
        let m = wgllm::model::Model::load(
            std::sync::Arc::new(g),
            &fixture("qwen2_bias_tied"),
            &bf16_opts(),
        )
        .unwrap();
        let l = layouts_of(&m);
        assert!(l.iter().all(|x| *x == layout), "{name}: {l:?}");
    }
}

/// A tune cache file (in a fresh temporary folder, kept alive by the
/// returned guard) holding `entries` (kernel, choice) for this adapter
/// under the CPU profile at [`shapes`]' shapes.
fn cpu_cache_file(entries: &[(&str, String)]) -> (tempfile::TempDir, std::path::PathBuf) {
    let s = shapes();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tune.json");
    let a = AdapterKey::of(&gpu_with(KernelProfile::CpuDevice, ""));
    let mut c = Cache::default();
    for (kernel, choice) in entries {
        c.put(entry(&a, kernel, &s.key(kernel), choice));
    }
    c.save(&path).unwrap();
    (dir, path)
}

/// A cache holding weights=texture and prefill=tiled (an old cache or a
/// hand edit; each entry valid alone) must not make the load fail: a
/// warning naming both and the fallback, weights=buffer (or prefill=rows
/// when weights=texture is forced), and the model loads and runs.
#[test]
fn inconsistent_cache_falls_back_with_a_warning() {
    let s = shapes();
    let (_dir, path) = cpu_cache_file(&[
        ("weights", "weights=texture".into()),
        ("prefill", "prefill=tiled,prefill_tile=16".into()),
    ]);
    for (forced, want_weights, want_prefill, fix) in [
        (
            "",
            WeightLayout::Buffer,
            PrefillKernel::Tiled,
            "falling back to weights=buffer",
        ),
        (
            "weights=texture",
            WeightLayout::Texture,
            PrefillKernel::RowBlocks,
            "falling back to prefill=rows",
        ),
    ] {
        let mut g = gpu_with(KernelProfile::CpuDevice, forced);
        let r = tune::prepare_with(&mut g, &s, TuneMode::Cache, false, &path).unwrap();
        let w = r.warnings.join(
            "
",
        );
        assert!(
            w.contains("tune.json")
                && w.contains("weights=texture")
                && w.contains("prefill=tiled (cache)")
                && w.contains(fix),
            "{forced:?}: {w}"
        );
        assert_eq!(
            WeightLayout::for_adapter(&g.caps),
            want_weights,
            "{forced:?}"
        );
        assert_eq!(
            PrefillKernel::for_adapter(&g.caps),
            want_prefill,
            "{forced:?}"
        );
        let changed = if forced.is_empty() {
            "weights"
        } else {
            "prefill"
        };
        let k = r.kernels.iter().find(|k| k.kernel == changed).unwrap();
        assert_eq!(k.source, "fallback");
        assert!(tune::describe(&g)
            .iter()
            .any(|d| d.starts_with(changed) && d.contains("(fallback)")));
        assert!(tune::conflict(&g).is_none());
        let mut m = wgllm::model::Model::load(
            std::sync::Arc::new(g),
            &fixture("qwen2_bias_tied"),
            &bf16_opts(),
        )
        .unwrap();
        assert!(
            layouts_of(&m).iter().all(|x| *x == want_weights),
            "{forced:?}"
        );
        // A prefill (several tokens) and a decode step run.
        let t = m.forward_next(&[1, 2, 3, 4]).unwrap();
        m.forward_next(&[t]).unwrap();
    }
}

/// `--tune auto` with a cached prefill=tiled and no weights entry tunes
/// weights against the cached prefill (texture is not timed), so it caches
/// weights=buffer and nothing needs the fallback: no warning, now or at the
/// next load. (The weights kernel used to be tuned before the cached
/// prefill was applied: texture won, the fallback overruled it, and the
/// cached texture brought the same warning back at every load.)
#[test]
fn tune_auto_tunes_a_missing_kernel_against_the_cached_ones() {
    let s = shapes();
    let probe = gpu_with(KernelProfile::CpuDevice, "");
    let mut entries: Vec<(&str, String)> = ["gemv", "attention", "argmax"]
        .map(|k| (k, tune::current_decisions(&probe, k).to_string()))
        .into();
    drop(probe);
    entries.push(("prefill", "prefill=tiled,prefill_tile=16".into()));
    let (_dir, path) = cpu_cache_file(&entries);

    let mut g = gpu_with(KernelProfile::CpuDevice, "");
    let r = tune::prepare_with(&mut g, &s, TuneMode::Auto, false, &path).unwrap();
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    let w = r.kernels.iter().find(|k| k.kernel == "weights").unwrap();
    assert_eq!(w.source, "tuner");
    assert_eq!(WeightLayout::for_adapter(&g.caps), WeightLayout::Buffer);
    // texture is either no candidate (texture_weights_readable) or not run
    assert!(
        !w.candidates
            .iter()
            .any(|(d, t)| d.weights == Some(WeightLayout::Texture) && t.is_ok()),
        "{:?}",
        w.candidates
    );
    let (saved, _) = Cache::load(&path);
    let e = saved
        .entries
        .iter()
        .find(|e| e.kernel == "weights")
        .unwrap();
    assert_eq!(e.choice, "weights=buffer");

    let mut g = gpu_with(KernelProfile::CpuDevice, "");
    let r = tune::prepare_with(&mut g, &s, TuneMode::Auto, false, &path).unwrap();
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    assert!(r.kernels.iter().all(|k| k.source == "cache"), "{r:?}");
    assert!(tune::conflict(&g).is_none());
}

/// Mixes of decisions no profile makes (with both profiles under them).
const MIXES: [&str; 3] = [
    "gemv=wg_shared,prefill=tiled,prefill_tile=16,attention=rows,attn_splits=4,argmax_wg=1024",
    "gemv=rows,gemv_rows_wg=256,prefill=rows,attention=workgroup,attn_splits=8,argmax_wg=64",
    "gemv=rows,gemv_rows_wg=32,prefill=tiled,prefill_tile=32,attention=rows,attn_min_split=1,attn_splits=64",
];

/// Under every mix, greedy decoding (one-token GEMV, split decode attention,
/// argmax each step) equals transformers' generate token for token, and
/// the last logits of a one-token-at-a-time run agree with PyTorch f32 as
/// closely as the taps must.
#[test]
fn tuned_mixes_decode_like_transformers() {
    use wgllm::compare::{RefKind, Tolerances};
    let name = "qwen2_bias_tied";
    let r = fixture(name).join("reference_f32.safetensors");
    let read = |t: &str| -> Vec<u32> {
        wgllm::taps::read_i32(&r, t)
            .unwrap()
            .unwrap()
            .into_iter()
            .map(|x| x as u32)
            .collect()
    };
    let tokens = read("tokens");
    let want = read("generated");
    let taps = wgllm::taps::TapSet::load(&r).unwrap();
    let wl = taps.get("logits").unwrap();
    let last_ref = &wl.data[(wl.rows - 1) * wl.cols..];
    for mix in MIXES {
        for kernels in [
            wgllm::gpu::KernelProfile::CpuDevice,
            wgllm::gpu::KernelProfile::Gpu,
        ] {
            let g = Gpu::new(&GpuOptions {
                kernels: Some(wgllm::gpu::KernelChoice::Force(kernels)),
                decisions: Some(mix.parse().unwrap()),
                ..Default::default()
            })
            .unwrap();
            let g = std::sync::Arc::new(g);
            let load = |max_batch| {
                let opts = wgllm::model::ModelOptions {
                    max_context: Some(tokens.len() + want.len()),
                    max_batch,
                    ..Default::default()
                };
                wgllm::model::Model::load(g.clone(), &fixture(name), &opts).unwrap()
            };
            let mut m = load(tokens.len());
            let mut got = vec![m.forward_next(&tokens).unwrap()];
            while got.len() < want.len() {
                let last = *got.last().unwrap();
                got.push(m.forward_next(&[last]).unwrap());
            }
            assert_eq!(got, want, "{mix} ({kernels:?}): GPU greedy");
            let mut m = load(1);
            let logits = m.forward_logits(&tokens).unwrap();
            let met = wgllm::compare::metrics(&logits, last_ref);
            // The same f32 bound as the taps (both sides compute in f32 on
            // the same weights; only summation order differs).
            let bound = Tolerances::defaults(RefKind::F32).default.nmse;
            assert!(met.nmse < bound, "{mix} ({kernels:?}): nmse {:e}", met.nmse);
        }
    }
}

// ------------------------------------------------------------------- CLI

/// The binary with the kernel and tuning settings this file chooses
/// cleared first (the backend stays the caller's).
fn wgllm(env: &[(&str, &str)], args: &[&str]) -> Output {
    let cleared = ["WGLLM_KERNELS", "WGLLM_DECISIONS", "WGLLM_TUNE"];
    common::wgllm_output(&cleared, env, args)
}

/// Mixes of decisions no profile makes: every one passes verify against
/// PyTorch f32 at the default tolerances (the same bounds as the profiles).
#[test]
fn tuned_mixes_pass_verify_against_pytorch() {
    let dir = fixture("qwen2_bias_tied");
    let reference = dir.join("reference_f32.safetensors");
    let cache = tempfile::tempdir().unwrap();
    for mix in MIXES {
        for kernels in ["cpu", "gpu"] {
            let out = wgllm(
                &[
                    ("WGLLM_DECISIONS", mix),
                    ("WGLLM_CACHE", cache.path().to_str().unwrap()),
                ],
                &[
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
            assert_eq!(
                out.status.code(),
                Some(0),
                "{kernels} {mix}: {}{}",
                text(&out.stdout),
                text(&out.stderr)
            );
        }
    }
    let e = wgllm(
        &[("WGLLM_DECISIONS", "gemv=fast")],
        &["verify", "--model", dir.to_str().unwrap()],
    );
    assert_eq!(e.status.code(), Some(2));
    let s = text(&e.stderr);
    assert!(
        s.contains("WGLLM_DECISIONS") && s.contains("wg_subgroup"),
        "{s}"
    );
}

/// `wgllm devices` lists adapters without building a model, but a malformed
/// `WGLLM_DECISIONS` (or `WGLLM_PARAMS`) is still an input error naming the
/// variable and what it takes, as every other command reports it (it used
/// to be swallowed: exit 0, no adapter marked selected).
#[test]
fn devices_rejects_malformed_decisions() {
    for (var, value, expected) in [
        ("WGLLM_DECISIONS", "gemv", "is not key=value"),
        ("WGLLM_DECISIONS", "no_such=1", "expected one of gemv,"),
        (
            "WGLLM_DECISIONS",
            "gemv=fast",
            "rows, wg_subgroup or wg_shared",
        ),
        ("WGLLM_DECISIONS", "attn_splits=0", "an integer in 1..=64"),
        ("WGLLM_PARAMS", "mmap", "is not a parameter binding"),
    ] {
        for args in [&["devices"][..], &["devices", "--json"][..]] {
            let e = wgllm(&[(var, value)], args);
            let s = text(&e.stderr);
            assert_eq!(e.status.code(), Some(2), "{var}={value} {args:?}: {s}");
            assert!(
                s.contains(&format!("{var}=\"{value}\"")) && s.contains(expected),
                "{var}={value} {args:?}: {s}"
            );
            assert!(e.stdout.is_empty(), "{var}={value}: {}", text(&e.stdout));
        }
    }
    // a well-formed value still lists the adapters with one selected
    let ok = wgllm(&[("WGLLM_DECISIONS", "attn_splits=4")], &["devices"]);
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    assert_eq!(text(&ok.stdout).matches("(selected)").count(), 1);
}

#[test]
fn tune_command_and_tune_auto() {
    let dir = fixture("qwen2_bias_tied");
    let cache = tempfile::tempdir().unwrap();
    let env = [("WGLLM_CACHE", cache.path().to_str().unwrap())];
    let out = wgllm(&env, &["tune", "--model", dir.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let kernels = v["kernels"].as_array().unwrap();
    assert_eq!(kernels.len(), tune::KERNELS.len(), "{v}");
    for k in kernels {
        assert_eq!(k["source"], "tuner", "{k}");
        let cands = k["candidates"].as_array().unwrap();
        assert!(
            cands
                .iter()
                .any(|c| c["decisions"] == k["choice"] && c["ms"].is_number()),
            "{k}"
        );
        // Every timed candidate of a linear kernel says which weight layout
        // its time was taken on; other kernels have none to say.
        let linear = ["weights", "gemv", "prefill"].contains(&k["kernel"].as_str().unwrap());
        for c in cands.iter().filter(|c| c["ms"].is_number()) {
            if linear {
                assert!(c["weights"] == "buffer" || c["weights"] == "texture", "{k}");
            } else {
                assert!(c["weights"].is_null(), "{k}");
            }
        }
    }
    let cache_file = cache.path().join("tune.json");
    assert_eq!(v["cache"], cache_file.to_str().unwrap());
    let (c, warn) = Cache::load(&cache_file);
    assert!(warn.is_none() && c.entries.len() == tune::KERNELS.len());

    // --tune auto with a cache that lacks one kernel's entry tunes that
    // kernel alone at load (its report on stderr), takes the rest from the
    // cache, writes the new entry, and verify still passes.
    let partial = tempfile::tempdir().unwrap();
    let mut c2 = c.clone();
    c2.entries.retain(|e| e.kernel != "argmax");
    c2.save(&partial.path().join("tune.json")).unwrap();
    let reference = dir.join("reference_f32.safetensors");
    let out = wgllm(
        &[("WGLLM_CACHE", partial.path().to_str().unwrap())],
        &[
            "--tune",
            "auto",
            "verify",
            "--model",
            dir.to_str().unwrap(),
            "--reference",
            reference.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let e = text(&out.stderr);
    assert!(
        e.contains("argmax [vocab") && e.contains("<- chosen"),
        "{e}"
    );
    assert!(e.contains("gemv [") && e.contains("(cache)"), "{e}");
    let (c3, _) = Cache::load(&partial.path().join("tune.json"));
    assert_eq!(c3.entries.len(), tune::KERNELS.len());

    // A corrupt cache file: a warning naming it, and the run goes on.
    std::fs::write(&cache_file, "{{{").unwrap();
    let out = wgllm(
        &env,
        &[
            "verify",
            "--model",
            dir.to_str().unwrap(),
            "--reference",
            reference.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let e = text(&out.stderr);
    assert!(
        e.contains("warning: tune cache") && e.contains("tune.json"),
        "{e}"
    );

    let out = wgllm(&env, &["--tune", "sometimes", "devices"]);
    assert_eq!(out.status.code(), Some(2));
}
