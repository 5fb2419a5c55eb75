//! ggml's tensor element types: their on-disk ids, block geometry and llama.cpp names.
//!
//! The parser must know the byte size of every type ggml defines, not only of those candle can
//! dequantize, so that it can check every tensor's extent when the file is opened; whether a
//! type can be turned into a candle tensor is asked separately ([`GgmlType::candle_dtype`]).

use std::fmt;

use candle_core::quantized::GgmlDType;

/// A ggml element type, with its raw id (`ggml_type` in `ggml.h`) as discriminant.
///
/// Ids 4, 5 (the removed Q4_2/Q4_3) and 31..=33, 36..=38 (removed repacked layouts) are not
/// types any current writer produces and are rejected as unknown.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q4_1 = 3,
    Q5_0 = 6,
    Q5_1 = 7,
    Q8_0 = 8,
    Q8_1 = 9,
    Q2K = 10,
    Q3K = 11,
    Q4K = 12,
    Q5K = 13,
    Q6K = 14,
    Q8K = 15,
    IQ2Xxs = 16,
    IQ2Xs = 17,
    IQ3Xxs = 18,
    IQ1S = 19,
    IQ4Nl = 20,
    IQ3S = 21,
    IQ2S = 22,
    IQ4Xs = 23,
    I8 = 24,
    I16 = 25,
    I32 = 26,
    I64 = 27,
    F64 = 28,
    IQ1M = 29,
    BF16 = 30,
    TQ1_0 = 34,
    TQ2_0 = 35,
    MXFP4 = 39,
    NVFP4 = 40,
    Q1_0 = 41,
}

/// ggml's super-block length for the k-quants and i-quants.
const QK_K: usize = 256;

impl GgmlType {
    /// The type for a raw id read from a file, or `None` if ggml defines no such type.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        use GgmlType::*;
        Some(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2K,
            11 => Q3K,
            12 => Q4K,
            13 => Q5K,
            14 => Q6K,
            15 => Q8K,
            16 => IQ2Xxs,
            17 => IQ2Xs,
            18 => IQ3Xxs,
            19 => IQ1S,
            20 => IQ4Nl,
            21 => IQ3S,
            22 => IQ2S,
            23 => IQ4Xs,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            29 => IQ1M,
            30 => BF16,
            34 => TQ1_0,
            35 => TQ2_0,
            39 => MXFP4,
            40 => NVFP4,
            41 => Q1_0,
            _ => return None,
        })
    }

    /// The raw id as stored in GGUF tensor infos.
    pub fn id(self) -> u32 {
        self as u32
    }

    /// The number of elements one block encodes; a row (ggml's `ne[0]`) must be a multiple.
    pub fn block_size(self) -> usize {
        use GgmlType::*;
        match self {
            F32 | F16 | BF16 | F64 | I8 | I16 | I32 | I64 => 1,
            Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q8_1 | IQ4Nl | MXFP4 => 32,
            NVFP4 => 64,
            Q1_0 => 128,
            Q2K | Q3K | Q4K | Q5K | Q6K | Q8K | IQ2Xxs | IQ2Xs | IQ3Xxs | IQ1S | IQ3S | IQ2S | IQ4Xs | IQ1M | TQ1_0
            | TQ2_0 => QK_K,
        }
    }

    /// The number of bytes one block occupies (`ggml_type_size`), from the block structs in
    /// `ggml-common.h` (gguf-py's table agrees except for Q8_1, where it keeps the old f32
    /// scales; no file stores Q8_1, ggml's activation-only type).
    pub fn type_size(self) -> usize {
        use GgmlType::*;
        match self {
            F32 | I32 => 4,
            F16 | BF16 | I16 => 2,
            F64 | I64 => 8,
            I8 => 1,
            Q4_0 => 2 + 16,
            Q4_1 => 2 * 2 + 16,
            Q5_0 => 2 + 4 + 16,
            Q5_1 => 2 * 2 + 4 + 16,
            Q8_0 => 2 + 32,
            Q8_1 => 2 * 2 + 32,
            Q2K => QK_K / 16 + QK_K / 4 + 2 * 2,
            Q3K => QK_K / 8 + QK_K / 4 + 12 + 2,
            Q4K => 2 * 2 + 12 + QK_K / 2,
            Q5K => 2 * 2 + 12 + QK_K / 8 + QK_K / 2,
            Q6K => QK_K / 2 + QK_K / 4 + QK_K / 16 + 2,
            Q8K => 4 + QK_K + QK_K / 16 * 2,
            IQ2Xxs => 2 + QK_K / 8 * 2,
            IQ2Xs => 2 + QK_K / 8 * 2 + QK_K / 32,
            IQ3Xxs => 2 + 3 * QK_K / 8,
            IQ1S => 2 + QK_K / 8 + QK_K / 16,
            IQ4Nl => 2 + 16,
            IQ3S => 2 + QK_K / 4 + QK_K / 32 + QK_K / 8 + QK_K / 64,
            IQ2S => 2 + QK_K / 4 + QK_K / 16,
            IQ4Xs => 2 + 2 + QK_K / 64 + QK_K / 2,
            IQ1M => QK_K / 8 + QK_K / 16 + QK_K / 32,
            TQ1_0 => 2 + (QK_K - 4 * QK_K / 64) / 5 + QK_K / 64,
            TQ2_0 => 2 + QK_K / 4,
            MXFP4 => 1 + 16,
            NVFP4 => 4 + 32,
            Q1_0 => 2 + 16,
        }
    }

    /// The candle type that holds this ggml type quantized, if candle implements it.
    pub fn candle_dtype(self) -> Option<GgmlDType> {
        use GgmlType::*;
        Some(match self {
            F32 => GgmlDType::F32,
            F16 => GgmlDType::F16,
            BF16 => GgmlDType::BF16,
            Q4_0 => GgmlDType::Q4_0,
            Q4_1 => GgmlDType::Q4_1,
            Q5_0 => GgmlDType::Q5_0,
            Q5_1 => GgmlDType::Q5_1,
            Q8_0 => GgmlDType::Q8_0,
            Q8_1 => GgmlDType::Q8_1,
            Q2K => GgmlDType::Q2K,
            Q3K => GgmlDType::Q3K,
            Q4K => GgmlDType::Q4K,
            Q5K => GgmlDType::Q5K,
            Q6K => GgmlDType::Q6K,
            Q8K => GgmlDType::Q8K,
            _ => return None,
        })
    }

    /// The plain (unquantized) candle dtype whose bytes are this type's bytes, if any.
    ///
    /// These are read with `Tensor::from_raw_buffer`, which is exact and needs no block
    /// machinery; ggml's I8 has no candle counterpart.
    pub fn plain_dtype(self) -> Option<candle_core::DType> {
        use candle_core::DType;
        Some(match self {
            GgmlType::F32 => DType::F32,
            GgmlType::F16 => DType::F16,
            GgmlType::BF16 => DType::BF16,
            GgmlType::F64 => DType::F64,
            GgmlType::I16 => DType::I16,
            GgmlType::I32 => DType::I32,
            GgmlType::I64 => DType::I64,
            _ => return None,
        })
    }

    /// llama.cpp's name for the type (`ggml_type_name`), e.g. `Q4_K`.
    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2K => "Q2_K",
            Q3K => "Q3_K",
            Q4K => "Q4_K",
            Q5K => "Q5_K",
            Q6K => "Q6_K",
            Q8K => "Q8_K",
            IQ2Xxs => "IQ2_XXS",
            IQ2Xs => "IQ2_XS",
            IQ3Xxs => "IQ3_XXS",
            IQ1S => "IQ1_S",
            IQ4Nl => "IQ4_NL",
            IQ3S => "IQ3_S",
            IQ2S => "IQ2_S",
            IQ4Xs => "IQ4_XS",
            I8 => "I8",
            I16 => "I16",
            I32 => "I32",
            I64 => "I64",
            F64 => "F64",
            IQ1M => "IQ1_M",
            BF16 => "BF16",
            TQ1_0 => "TQ1_0",
            TQ2_0 => "TQ2_0",
            MXFP4 => "MXFP4",
            NVFP4 => "NVFP4",
            Q1_0 => "Q1_0",
        }
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip() {
        for id in 0..64 {
            if let Some(t) = GgmlType::from_id(id) {
                assert_eq!(t.id(), id);
            }
        }
        assert_eq!(GgmlType::from_id(4), None);
        assert_eq!(GgmlType::from_id(42), None);
    }

    /// gguf-py 0.19's `GGML_QUANT_SIZES` (block size, bytes), but Q8_1 as ggml's 36-byte struct.
    #[test]
    fn sizes_agree_with_gguf_py() {
        let table: [(u32, usize, usize); 34] = [
            (0, 1, 4),
            (1, 1, 2),
            (2, 32, 18),
            (3, 32, 20),
            (6, 32, 22),
            (7, 32, 24),
            (8, 32, 34),
            (9, 32, 36),
            (10, 256, 84),
            (11, 256, 110),
            (12, 256, 144),
            (13, 256, 176),
            (14, 256, 210),
            (15, 256, 292),
            (16, 256, 66),
            (17, 256, 74),
            (18, 256, 98),
            (19, 256, 50),
            (20, 32, 18),
            (21, 256, 110),
            (22, 256, 82),
            (23, 256, 136),
            (24, 1, 1),
            (25, 1, 2),
            (26, 1, 4),
            (27, 1, 8),
            (28, 1, 8),
            (29, 256, 56),
            (30, 1, 2),
            (34, 256, 54),
            (35, 256, 66),
            (39, 32, 17),
            (40, 64, 36),
            (41, 128, 18),
        ];
        for (id, block, bytes) in table {
            let t = GgmlType::from_id(id).unwrap();
            assert_eq!((t.block_size(), t.type_size()), (block, bytes), "{t}");
        }
    }

    /// The byte sizes candle's block structs have must agree with ours, or the extent checks
    /// done at open time would not protect the dequantizer.
    #[test]
    fn sizes_agree_with_candle() {
        for id in 0..64 {
            let Some(t) = GgmlType::from_id(id) else {
                continue;
            };
            if let Some(c) = t.candle_dtype() {
                assert_eq!(t.type_size(), c.type_size(), "{t}");
                assert_eq!(t.block_size(), c.block_size(), "{t}");
            }
        }
    }
}
