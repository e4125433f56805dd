//! A standalone repro for host-memory growth per submission on a wgpu
//! backend (raw wgpu, no wgllm code). Each iteration records one command
//! buffer, submits it and waits; VmRSS is printed as it goes.
//!
//! ```text
//! cargo run --release --example vk_leak_probe -- <mode> [iterations] [dispatches] [backend]
//! ```
//!
//! Modes (each adds to the one before where it says so):
//! - `empty`: an empty command buffer, submit, wait.
//! - `dispatch`: one compute pass with `dispatches` dispatches of a tiny
//!   kernel on one bind group made once.
//! - `passes`: `dispatches` compute passes of one dispatch each.
//! - `bindgroup`: `dispatch`, with a new bind group every iteration.
//! - `write`: `dispatch` plus a 16-byte `queue.write_buffer` per iteration.
//! - `readback`: `dispatch` plus a copy into a staging buffer, `map_async`,
//!   wait, read, unmap.
//!
//! - `uniformloop`: `write`, with a kernel whose branch and loop bound read
//!   that uniform (as wgllm's kernels read `n_tokens`, `kv_len`, `k`).
//! - `storageloop`: the same loop reading the value from a read-only
//!   storage buffer instead of a uniform.
//!
//! `backend` is `vulkan` (default) or `gl`.

use std::time::Instant;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

const SRC: &str = r#"
@group(0) @binding(0) var<storage, read_write> data: array<u32>;
@group(0) @binding(1) var<uniform> step: vec4<u32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    if (id.x < arrayLength(&data)) {
        data[id.x] = data[id.x] + step.x + 1u;
    }
}
"#;

/// The same kernel with a loop bounded by a value of the uniform (as
/// wgllm's attention and matmul loops are bounded by the step's kv_len and
/// n_tokens), or by the same value read from a read-only storage buffer.
const SRC_LOOP: &str = r#"
@group(0) @binding(0) var<storage, read_write> data: array<u32>;
@group(0) @binding(1) var<STEP_CLASS> step: vec4<u32>;
@group(0) @binding(2) var<STEP_CLASS> params: vec4<u32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    if (id.x >= params.x) {
        return;
    }
    var acc = data[id.x];
    if (step.y <= 1u) {
        // the one-token path (as decode's n_tokens = 1)
        acc = acc + 1u;
    } else {
        // a longer path that a known step.y removes entirely
        for (var j = 0u; j < params.y; j++) {
            acc = acc * 1664525u + 1013904223u + data[(id.x + j * 1u) % arrayLength(&data)];
            acc = acc ^ (acc >> 3u);
            acc = acc * 1664527u + 1013904224u + data[(id.x + j * 2u) % arrayLength(&data)];
            acc = acc ^ (acc >> 4u);
            acc = acc * 1664529u + 1013904225u + data[(id.x + j * 3u) % arrayLength(&data)];
            acc = acc ^ (acc >> 5u);
            acc = acc * 1664531u + 1013904226u + data[(id.x + j * 4u) % arrayLength(&data)];
            acc = acc ^ (acc >> 6u);
            acc = acc * 1664533u + 1013904227u + data[(id.x + j * 5u) % arrayLength(&data)];
            acc = acc ^ (acc >> 7u);
            acc = acc * 1664535u + 1013904228u + data[(id.x + j * 6u) % arrayLength(&data)];
            acc = acc ^ (acc >> 8u);
            acc = acc * 1664537u + 1013904229u + data[(id.x + j * 7u) % arrayLength(&data)];
            acc = acc ^ (acc >> 9u);
            acc = acc * 1664539u + 1013904230u + data[(id.x + j * 8u) % arrayLength(&data)];
            acc = acc ^ (acc >> 10u);
            acc = acc * 1664541u + 1013904231u + data[(id.x + j * 9u) % arrayLength(&data)];
            acc = acc ^ (acc >> 11u);
            acc = acc * 1664543u + 1013904232u + data[(id.x + j * 10u) % arrayLength(&data)];
            acc = acc ^ (acc >> 12u);
            acc = acc * 1664545u + 1013904233u + data[(id.x + j * 11u) % arrayLength(&data)];
            acc = acc ^ (acc >> 13u);
            acc = acc * 1664547u + 1013904234u + data[(id.x + j * 12u) % arrayLength(&data)];
            acc = acc ^ (acc >> 14u);
            acc = acc * 1664549u + 1013904235u + data[(id.x + j * 13u) % arrayLength(&data)];
            acc = acc ^ (acc >> 15u);
            acc = acc * 1664551u + 1013904236u + data[(id.x + j * 14u) % arrayLength(&data)];
            acc = acc ^ (acc >> 16u);
            acc = acc * 1664553u + 1013904237u + data[(id.x + j * 15u) % arrayLength(&data)];
            acc = acc ^ (acc >> 17u);
            acc = acc * 1664555u + 1013904238u + data[(id.x + j * 16u) % arrayLength(&data)];
            acc = acc ^ (acc >> 18u);
        }
    }
    data[id.x] = acc;
}
"#;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map(String::as_str).unwrap_or("dispatch");
    let iters: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(500);
    let dispatches: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(100);
    let backends = match args.get(4).map(String::as_str).unwrap_or("vulkan") {
        "gl" => wgpu::Backends::GL,
        _ => wgpu::Backends::VULKAN,
    };
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    desc.backends = backends;
    let inst = wgpu::Instance::new(desc);
    let adapter = pollster::block_on(inst.request_adapter(&wgpu::RequestAdapterOptions::default()))
        .expect("an adapter");
    println!("adapter: {:?}", adapter.get_info());
    // `WGLLM_PROBE_DEVICE=full`: the adapter's own limits and the features
    // wgllm asks for, as wgllm's Gpu::new does.
    let full = std::env::var("WGLLM_PROBE_DEVICE").is_ok_and(|v| v == "full");
    let dd = if full {
        let wanted =
            wgpu::Features::SHADER_F16 | wgpu::Features::SUBGROUP | wgpu::Features::TIMESTAMP_QUERY;
        wgpu::DeviceDescriptor {
            label: None,
            required_features: adapter.features() & wanted,
            required_limits: adapter.limits(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }
    } else {
        wgpu::DeviceDescriptor::default()
    };
    let (device, queue) = pollster::block_on(adapter.request_device(&dd)).expect("a device");
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: None,
        source: wgpu::ShaderSource::Wgsl(match mode {
            "uniformloop" => SRC_LOOP.replace("STEP_CLASS", "uniform").into(),
            "storageloop" => SRC_LOOP.replace("STEP_CLASS", "storage, read").into(),
            _ => SRC.into(),
        }),
    });
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: None,
        layout: None,
        module: &module,
        entry_point: Some("main"),
        compilation_options: Default::default(),
        cache: None,
    });
    let n = 4096u64;
    let data = device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: n * 4,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    });
    let uni = device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 16,
        usage: wgpu::BufferUsages::UNIFORM
            | wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let staging = device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 16,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let params = device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 16,
        usage: wgpu::BufferUsages::UNIFORM
            | wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    queue.write_buffer(&params, 0, bytemuck::cast_slice(&[n as u32, 16, 0, 0]));
    let looped = matches!(mode, "uniformloop" | "storageloop");
    let layout = pipeline.get_bind_group_layout(0);
    let make_bg = || {
        let mut entries = vec![
            wgpu::BindGroupEntry {
                binding: 0,
                resource: data.as_entire_binding(),
            },
            wgpu::BindGroupEntry {
                binding: 1,
                resource: uni.as_entire_binding(),
            },
        ];
        if looped {
            entries.push(wgpu::BindGroupEntry {
                binding: 2,
                resource: params.as_entire_binding(),
            });
        }
        device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &layout,
            entries: &entries,
        })
    };
    let bg = make_bg();
    let groups = (n as u32).div_ceil(64);
    let wait = || {
        device
            .poll(wgpu::PollType::wait_indefinitely())
            .expect("poll");
    };
    let r0 = rss_kib();
    let t0 = Instant::now();
    println!("mode {mode}, {iters} iterations, {dispatches} dispatches; VmRSS start {r0} KiB");
    for i in 0..iters {
        let mut enc = device.create_command_encoder(&Default::default());
        let fresh;
        let bgr = if mode == "bindgroup" {
            fresh = make_bg();
            &fresh
        } else {
            &bg
        };
        if matches!(mode, "write" | "uniformloop" | "storageloop") {
            // A new value every iteration, as a decode step's position is.
            // (`WGLLM_PROBE_CONST=1`: the same value every time.)
            let v = if std::env::var_os("WGLLM_PROBE_CONST").is_some() {
                0
            } else {
                i as u32 % 64
            };
            queue.write_buffer(&uni, 0, bytemuck::cast_slice(&[v, 1, v, 0]));
        }
        match mode {
            "empty" => {}
            "passes" => {
                for _ in 0..dispatches {
                    let mut pass = enc.begin_compute_pass(&Default::default());
                    pass.set_pipeline(&pipeline);
                    pass.set_bind_group(0, bgr, &[]);
                    pass.dispatch_workgroups(groups, 1, 1);
                }
            }
            _ => {
                let mut pass = enc.begin_compute_pass(&Default::default());
                for _ in 0..dispatches {
                    pass.set_pipeline(&pipeline);
                    pass.set_bind_group(0, bgr, &[]);
                    pass.dispatch_workgroups(groups, 1, 1);
                }
            }
        }
        if mode == "readback" {
            enc.copy_buffer_to_buffer(&data, 0, &staging, 0, 16);
        }
        queue.submit([enc.finish()]);
        if mode == "readback" {
            let slice = staging.slice(..);
            slice.map_async(wgpu::MapMode::Read, |r| r.expect("map"));
            wait();
            let v = slice.get_mapped_range().expect("view")[0];
            std::hint::black_box(v);
            staging.unmap();
        } else {
            wait();
        }
        if (i + 1) % (iters / 10).max(1) == 0 {
            let r = rss_kib();
            println!(
                "  after {:>6}: VmRSS {r} KiB (+{} KiB, {:.1} KiB/iteration), {:.2} ms/iteration",
                i + 1,
                r as i64 - r0 as i64,
                (r as f64 - r0 as f64) / (i + 1) as f64,
                t0.elapsed().as_secs_f64() * 1e3 / (i + 1) as f64
            );
        }
    }
}
