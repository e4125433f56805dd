//! Implementations of the CLI subcommands (kept in the library so they can be
//! tested and reused).

use std::process::ExitCode;

use crate::gpu::{list_adapters, AdapterDesc, Gpu, GpuOptions};

fn features_list(f: wgpu::Features) -> Vec<String> {
    let interesting = [
        (wgpu::Features::SHADER_F16, "SHADER_F16"),
        (wgpu::Features::SUBGROUP, "SUBGROUP"),
        (wgpu::Features::SUBGROUP_BARRIER, "SUBGROUP_BARRIER"),
        (wgpu::Features::TIMESTAMP_QUERY, "TIMESTAMP_QUERY"),
        (
            wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES,
            "TIMESTAMP_QUERY_INSIDE_PASSES",
        ),
        (wgpu::Features::SHADER_INT64, "SHADER_INT64"),
        (wgpu::Features::SHADER_F64, "SHADER_F64"),
    ];
    interesting
        .iter()
        .filter(|(flag, _)| f.contains(*flag))
        .map(|(_, n)| n.to_string())
        .collect()
}

fn adapter_json(d: &AdapterDesc, chosen: bool) -> serde_json::Value {
    let l = &d.limits;
    serde_json::json!({
        "index": d.index,
        "name": d.info.name,
        "backend": format!("{:?}", d.info.backend),
        "device_type": format!("{:?}", d.info.device_type),
        "driver": d.info.driver,
        "driver_info": d.info.driver_info,
        "vendor": d.info.vendor,
        "device": d.info.device,
        "subgroup_size": [d.info.subgroup_min_size, d.info.subgroup_max_size],
        "limits": {
            "max_storage_buffer_binding_size": l.max_storage_buffer_binding_size,
            "max_buffer_size": l.max_buffer_size,
            "max_compute_workgroup_storage_size": l.max_compute_workgroup_storage_size,
            "max_compute_invocations_per_workgroup": l.max_compute_invocations_per_workgroup,
            "max_compute_workgroups_per_dimension": l.max_compute_workgroups_per_dimension,
            "max_storage_buffers_per_shader_stage": l.max_storage_buffers_per_shader_stage,
        },
        "features": features_list(d.features),
        "default": chosen,
    })
}

/// `wgllm devices`: every adapter, and which one wgllm would use.
pub fn devices(selector: Option<&str>, json: bool) -> anyhow::Result<ExitCode> {
    let all: Vec<AdapterDesc> = list_adapters().into_iter().map(|(_, d)| d).collect();
    if all.is_empty() {
        // Same message as Gpu::new, so users get the install hint.
        let e = Gpu::new(&GpuOptions::default()).err();
        anyhow::bail!(
            "{}",
            e.map(|e| e.to_string())
                .unwrap_or_else(|| "no adapters".into())
        );
    }
    let chosen = Gpu::new(&GpuOptions {
        adapter: selector.map(str::to_string),
        ..Default::default()
    })
    .ok()
    .map(|g| g.adapter.index);
    if json {
        let v: Vec<_> = all
            .iter()
            .map(|d| adapter_json(d, Some(d.index) == chosen))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    for d in &all {
        let l = &d.limits;
        let mark = if Some(d.index) == chosen {
            "  (selected)"
        } else {
            ""
        };
        println!("[{}] {}{}", d.index, d.info.name, mark);
        println!(
            "    backend: {:?}   type: {:?}",
            d.info.backend, d.info.device_type
        );
        println!("    driver: {} {}", d.info.driver, d.info.driver_info);
        println!(
            "    subgroup size: {}..{}",
            d.info.subgroup_min_size, d.info.subgroup_max_size
        );
        println!(
            "    max_storage_buffer_binding_size: {} ({} MiB)",
            l.max_storage_buffer_binding_size,
            l.max_storage_buffer_binding_size >> 20
        );
        println!("    max_buffer_size: {}", l.max_buffer_size);
        println!(
            "    max_compute_workgroup_storage_size: {}",
            l.max_compute_workgroup_storage_size
        );
        println!(
            "    max_compute_invocations_per_workgroup: {}",
            l.max_compute_invocations_per_workgroup
        );
        println!(
            "    max_compute_workgroups_per_dimension: {}",
            l.max_compute_workgroups_per_dimension
        );
        println!("    features: {}", features_list(d.features).join(" "));
    }
    Ok(ExitCode::SUCCESS)
}
