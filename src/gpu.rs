//! The wgpu device context: adapter choice, the adapter's own limits and
//! features, buffer helpers, pipeline creation and readback.
//!
//! Everything that talks to wgpu directly lives here so ops only describe
//! their kernels (WGSL + params) and their bindings.

use std::sync::Arc;

use crate::error::{Error, Result};

/// WGSL helpers prepended to every kernel (bf16 widening, 2D grid indexing).
pub const COMMON_WGSL: &str = include_str!("../shaders/common.wgsl");

/// What the chosen adapter can do, as far as our kernels care.
#[derive(Clone, Debug)]
pub struct Caps {
    pub shader_f16: bool,
    pub subgroup: bool,
    pub subgroup_min_size: u32,
    pub subgroup_max_size: u32,
    /// Largest buffer we may bind as one storage binding.
    pub max_binding: u64,
    pub max_buffer: u64,
    pub max_workgroups_per_dim: u32,
    pub max_workgroup_storage: u32,
    pub max_invocations: u32,
    /// Software rasterizer / CPU device (lavapipe, SwiftShader, WARP).
    pub is_cpu: bool,
}

/// Description of one adapter, for `wgllm devices` and error messages.
#[derive(Clone, Debug)]
pub struct AdapterDesc {
    pub index: usize,
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    pub features: wgpu::Features,
}

impl AdapterDesc {
    fn rank(&self) -> u32 {
        match self.info.device_type {
            wgpu::DeviceType::DiscreteGpu => 0,
            wgpu::DeviceType::IntegratedGpu => 1,
            wgpu::DeviceType::VirtualGpu => 2,
            wgpu::DeviceType::Other => 3,
            wgpu::DeviceType::Cpu => 4,
        }
    }
}

pub struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub adapter: AdapterDesc,
    pub caps: Caps,
}

fn instance() -> wgpu::Instance {
    wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env())
}

/// Every adapter wgpu can see, in wgpu's order.
pub fn list_adapters() -> Vec<(wgpu::Adapter, AdapterDesc)> {
    let inst = instance();
    let adapters = pollster::block_on(inst.enumerate_adapters(wgpu::Backends::all()));
    adapters
        .into_iter()
        .enumerate()
        .map(|(index, a)| {
            let desc = AdapterDesc {
                index,
                info: a.get_info(),
                limits: a.limits(),
                features: a.features(),
            };
            (a, desc)
        })
        .collect()
}

/// Choose an adapter: by `selector` (index, or a case-insensitive substring of
/// the name) when given, else the best kind (discrete > integrated > virtual >
/// other > CPU), preferring Vulkan/Metal/DX12 over GL on ties.
fn choose(
    mut all: Vec<(wgpu::Adapter, AdapterDesc)>,
    selector: Option<&str>,
) -> Result<(wgpu::Adapter, AdapterDesc)> {
    if all.is_empty() {
        return Err(Error::NoAdapter(
            "wgpu enumerated no Vulkan, Metal, DX12 or GL adapters".into(),
        ));
    }
    let names = || {
        all_names(
            &all.iter()
                .map(|(_, d)| d.clone())
                .collect::<Vec<AdapterDesc>>(),
        )
    };
    if let Some(sel) = selector.map(str::trim).filter(|s| !s.is_empty()) {
        if let Ok(i) = sel.parse::<usize>() {
            if i < all.len() {
                return Ok(all.swap_remove(i));
            }
            return Err(Error::AdapterSelect(format!(
                "adapter index {i} out of range; available: {}",
                names()
            )));
        }
        let lower = sel.to_lowercase();
        if let Some(pos) = all
            .iter()
            .position(|(_, d)| d.info.name.to_lowercase().contains(&lower))
        {
            return Ok(all.swap_remove(pos));
        }
        return Err(Error::AdapterSelect(format!(
            "no adapter name contains '{sel}'; available: {}",
            names()
        )));
    }
    let gl_penalty = |d: &AdapterDesc| u32::from(d.info.backend == wgpu::Backend::Gl);
    let best = all
        .iter()
        .enumerate()
        .min_by_key(|(_, (_, d))| (d.rank(), gl_penalty(d), d.index))
        .map(|(i, _)| i)
        .expect("non-empty");
    Ok(all.swap_remove(best))
}

fn all_names(all: &[AdapterDesc]) -> String {
    all.iter()
        .map(|d| format!("[{}] {} ({:?})", d.index, d.info.name, d.info.backend))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Options for creating a [`Gpu`].
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// Adapter index or name substring; falls back to `WGLLM_ADAPTER`.
    pub adapter: Option<String>,
    /// Cap the storage-binding size used for splitting tensors (tests use a
    /// tiny value so the split paths run on small data). Never raises the
    /// adapter's own limit.
    pub max_binding_override: Option<u64>,
}

impl Gpu {
    /// Create a device on the best (or selected) adapter with the adapter's
    /// own limits and the optional features our kernels can use.
    pub fn new(opts: &GpuOptions) -> Result<Self> {
        let selector = opts
            .adapter
            .clone()
            .or_else(|| std::env::var("WGLLM_ADAPTER").ok());
        let (adapter, desc) = choose(list_adapters(), selector.as_deref())?;
        let wanted =
            wgpu::Features::SHADER_F16 | wgpu::Features::SUBGROUP | wgpu::Features::TIMESTAMP_QUERY;
        let features = desc.features & wanted;
        let limits = desc.limits.clone();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("wgllm"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| Error::Device {
            adapter: desc.info.name.clone(),
            msg: e.to_string(),
        })?;
        // Pipeline creation is checked with an error scope (see `kernel`);
        // bind groups and dispatches are validated by the ops before they are
        // made, so a wgpu validation error past that point is a wgllm bug.
        let mut max_binding = limits.max_storage_buffer_binding_size;
        if let Some(cap) = opts.max_binding_override {
            max_binding = max_binding.min(cap.max(4));
        }
        let caps = Caps {
            shader_f16: features.contains(wgpu::Features::SHADER_F16),
            subgroup: features.contains(wgpu::Features::SUBGROUP),
            subgroup_min_size: desc.info.subgroup_min_size,
            subgroup_max_size: desc.info.subgroup_max_size,
            max_binding,
            max_buffer: limits.max_buffer_size,
            max_workgroups_per_dim: limits.max_compute_workgroups_per_dimension,
            max_workgroup_storage: limits.max_compute_workgroup_storage_size,
            max_invocations: limits.max_compute_invocations_per_workgroup,
            is_cpu: desc.info.device_type == wgpu::DeviceType::Cpu,
        };
        let desc = AdapterDesc {
            features,
            limits,
            ..desc
        };
        Ok(Gpu {
            device,
            queue,
            adapter: desc,
            caps,
        })
    }

    pub fn name(&self) -> &str {
        &self.adapter.info.name
    }

    // ---------------------------------------------------------------- buffers

    /// A storage buffer holding `data` (padded to a multiple of 4 bytes).
    pub fn storage_init(&self, label: &str, data: &[u8]) -> Result<wgpu::Buffer> {
        let size = pad4(data.len() as u64).max(4);
        let buf = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_DST
                | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: true,
        });
        fill_mapped(&buf, label, data)?;
        Ok(buf)
    }

    /// A zero-filled storage buffer of `size` bytes (rounded up to 4).
    pub fn storage(&self, label: &str, size: u64) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: pad4(size).max(4),
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_DST
                | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        })
    }

    /// A uniform buffer holding `data`; writable later with `queue.write_buffer`.
    pub fn uniform<T: bytemuck::Pod>(&self, label: &str, data: &T) -> Result<wgpu::Buffer> {
        let bytes = bytemuck::bytes_of(data);
        let buf = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: pad16(bytes.len() as u64),
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: true,
        });
        fill_mapped(&buf, label, bytes)?;
        Ok(buf)
    }

    /// A staging buffer for readback of `size` bytes.
    pub fn staging(&self, label: &str, size: u64) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: pad4(size).max(4),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    /// Copy `len` bytes at `offset` of `src` back to the host. Blocks.
    pub fn read_bytes(&self, src: &wgpu::Buffer, offset: u64, len: u64) -> Result<Vec<u8>> {
        let staging = self.staging("readback", len);
        let mut enc = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        enc.copy_buffer_to_buffer(src, offset, &staging, 0, pad4(len));
        self.queue.submit([enc.finish()]);
        self.map_staging(&staging, len)
    }

    /// Map a staging buffer that a submitted copy filled, and return its bytes.
    pub fn map_staging(&self, staging: &wgpu::Buffer, len: u64) -> Result<Vec<u8>> {
        let slice = staging.slice(..);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.wait()?;
        match rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(Error::Gpu {
                    what: "readback map".into(),
                    msg: e.to_string(),
                })
            }
            Err(_) => {
                return Err(Error::Gpu {
                    what: "readback map".into(),
                    msg: "map callback never ran".into(),
                })
            }
        }
        let out = {
            let view = slice.get_mapped_range().map_err(|e| Error::Gpu {
                what: "readback view".into(),
                msg: e.to_string(),
            })?;
            view[..len as usize].to_vec()
        };
        staging.unmap();
        Ok(out)
    }

    /// Read `n` f32 values from the start of `src`.
    pub fn read_f32(&self, src: &wgpu::Buffer, n: usize) -> Result<Vec<f32>> {
        let bytes = self.read_bytes(src, 0, (n * 4) as u64)?;
        Ok(bytemuck::cast_slice(&bytes).to_vec())
    }

    /// Read `n` u32 values from the start of `src`.
    pub fn read_u32(&self, src: &wgpu::Buffer, n: usize) -> Result<Vec<u32>> {
        let bytes = self.read_bytes(src, 0, (n * 4) as u64)?;
        Ok(bytemuck::cast_slice(&bytes).to_vec())
    }

    /// Block until the queue is idle.
    pub fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|e| Error::Gpu {
                what: "device poll".into(),
                msg: e.to_string(),
            })
    }

    // -------------------------------------------------------------- pipelines

    /// Compile `source` (with the common helpers prepended) into a compute
    /// pipeline with an auto-derived layout. `constants` fill WGSL `override`s.
    pub fn kernel(
        &self,
        label: &str,
        source: &str,
        entry: &str,
        constants: &[(&str, f64)],
    ) -> Result<Kernel> {
        let full = format!("{COMMON_WGSL}\n{source}");
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = self
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(label),
                source: wgpu::ShaderSource::Wgsl(full.into()),
            });
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(label),
                layout: None,
                module: &module,
                entry_point: Some(entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants,
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            });
        if let Some(err) = pollster::block_on(scope.pop()) {
            return Err(Error::Gpu {
                what: format!("compiling kernel '{label}' entry '{entry}'"),
                msg: err.to_string(),
            });
        }
        let layout = pipeline.get_bind_group_layout(0);
        Ok(Kernel {
            label: label.to_string(),
            pipeline: Arc::new(pipeline),
            layout,
        })
    }

    /// Bind `buffers` to bindings 0..n of `kernel`'s group 0 (whole buffers).
    pub fn bind(&self, kernel: &Kernel, buffers: &[&wgpu::Buffer]) -> wgpu::BindGroup {
        let entries: Vec<wgpu::BindGroupEntry> = buffers
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: b.as_entire_binding(),
            })
            .collect();
        self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(&kernel.label),
            layout: &kernel.layout,
            entries: &entries,
        })
    }

    /// Workgroup grid for `n` workgroups: 1D while it fits in one dimension,
    /// else 2D (`x` = max per dimension). Kernels recover the linear index with
    /// `wg_linear()` from common.wgsl and must guard against overshoot.
    pub fn grid(&self, n: u32) -> (u32, u32, u32) {
        grid_for(n, self.caps.max_workgroups_per_dim)
    }

    /// Encode one dispatch of `n` workgroups (2D when needed) in its own pass.
    pub fn dispatch(
        &self,
        enc: &mut wgpu::CommandEncoder,
        kernel: &Kernel,
        bind: &wgpu::BindGroup,
        n: u32,
    ) {
        if n == 0 {
            return;
        }
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some(&kernel.label),
            timestamp_writes: None,
        });
        self.dispatch_in(&mut pass, kernel, bind, n);
    }

    /// Encode one dispatch of `n` workgroups into an existing pass.
    pub fn dispatch_in(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        kernel: &Kernel,
        bind: &wgpu::BindGroup,
        n: u32,
    ) {
        if n == 0 {
            return;
        }
        let (x, y, z) = self.grid(n);
        pass.set_pipeline(&kernel.pipeline);
        pass.set_bind_group(0, bind, &[]);
        pass.dispatch_workgroups(x, y, z);
    }

    pub fn encoder(&self) -> wgpu::CommandEncoder {
        self.device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None })
    }

    /// Submit and wait; report validation errors raised while encoding.
    pub fn submit_wait(&self, enc: wgpu::CommandEncoder) -> Result<()> {
        self.queue.submit([enc.finish()]);
        self.wait()
    }
}

/// A compiled compute pipeline and its group-0 layout.
#[derive(Clone)]
pub struct Kernel {
    pub label: String,
    pub pipeline: Arc<wgpu::ComputePipeline>,
    pub layout: wgpu::BindGroupLayout,
}

/// Copy `data` into a buffer created with `mapped_at_creation`, then unmap.
fn fill_mapped(buf: &wgpu::Buffer, label: &str, data: &[u8]) -> Result<()> {
    {
        let mut view = buf
            .slice(..)
            .get_mapped_range_mut()
            .map_err(|e| Error::Gpu {
                what: format!("mapping new buffer '{label}'"),
                msg: e.to_string(),
            })?;
        view.slice(..data.len()).copy_from_slice(data);
    }
    buf.unmap();
    Ok(())
}

/// See [`Gpu::grid`].
pub fn grid_for(n: u32, max_per_dim: u32) -> (u32, u32, u32) {
    let max = max_per_dim.max(1);
    if n <= max {
        (n, 1, 1)
    } else {
        let y = n.div_ceil(max);
        (max, y, 1)
    }
}

pub fn pad4(n: u64) -> u64 {
    n.div_ceil(4) * 4
}

pub fn pad16(n: u64) -> u64 {
    n.div_ceil(16).max(1) * 16
}

/// The per-step values every kernel can read (binding 1 of each kernel): the
/// number of tokens in this pass and where they sit in the sequence.
/// Written once per step with `queue.write_buffer`, never reallocated.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Step {
    /// Tokens processed in this pass (rows of the activations).
    pub n_tokens: u32,
    /// Position of the first of them in the sequence.
    pub pos_offset: u32,
    /// Valid KV positions after this pass (= pos_offset + n_tokens).
    pub kv_len: u32,
    pub _pad: u32,
}

impl Step {
    pub fn new(n_tokens: u32, pos_offset: u32) -> Self {
        Step {
            n_tokens,
            pos_offset,
            kv_len: pos_offset + n_tokens,
            _pad: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_switches_to_2d_past_the_limit() {
        assert_eq!(grid_for(10, 65535), (10, 1, 1));
        assert_eq!(grid_for(65535, 65535), (65535, 1, 1));
        assert_eq!(grid_for(65536, 65535), (65535, 2, 1));
        assert_eq!(grid_for(151936, 65535), (65535, 3, 1));
        // every workgroup index < n is covered exactly once by x + y * X
        let (x, y, _) = grid_for(1000, 64);
        assert!(x * y >= 1000 && x * (y - 1) < 1000);
    }
}
