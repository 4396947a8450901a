//! A tiny random-weight llama model in GGUF, written by the test itself: 2 layers, a 259-token
//! byte vocabulary (`<unk>`, `<s>`, `</s>` and `<0x00>`…`<0xFF>`), a ChatML chat template,
//! about 400 KB. Its answers are gibberish, but printable ASCII gibberish: every embedding has
//! a large constant first component, and the output layer turns that component into a high
//! logit for the printable bytes and the end token, a very low one for everything else (a
//! random-weight model left alone emits invalid UTF-8, which llama-server's chat parser
//! refuses).
//!
//! GGUF v3 as llama.cpp reads it: the magic, version, tensor and key counts, the key/value
//! metadata, the tensor infos (name, dims with the fastest-varying first, type, offset into
//! the data), then the tensor data, each tensor aligned to 32 bytes.

use std::path::Path;

const N_EMBD: usize = 64;
const N_FF: usize = 128;
const N_HEAD: u32 = 4;
const N_LAYER: usize = 2;
pub const N_VOCAB: usize = 259;
pub const CONTEXT: u32 = 2048;
const ALIGN: usize = 32;
pub const EOS: u32 = 2;

enum Val {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    F32s(Vec<f32>),
    I32s(Vec<i32>),
}

struct Out(Vec<u8>);

impl Out {
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn str(&mut self, s: &str) {
        self.u64(s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
    }
    fn val(&mut self, v: &Val) {
        // Value types: 4 u32, 5 i32, 6 f32, 7 bool, 8 string, 9 array.
        match v {
            Val::U32(x) => {
                self.u32(4);
                self.u32(*x);
            }
            Val::F32(x) => {
                self.u32(6);
                self.0.extend_from_slice(&x.to_le_bytes());
            }
            Val::Bool(b) => {
                self.u32(7);
                self.0.push(u8::from(*b));
            }
            Val::Str(s) => {
                self.u32(8);
                self.str(s);
            }
            Val::Strs(a) => {
                self.u32(9);
                self.u32(8);
                self.u64(a.len() as u64);
                for s in a {
                    self.str(s);
                }
            }
            Val::F32s(a) => {
                self.u32(9);
                self.u32(6);
                self.u64(a.len() as u64);
                for x in a {
                    self.0.extend_from_slice(&x.to_le_bytes());
                }
            }
            Val::I32s(a) => {
                self.u32(9);
                self.u32(5);
                self.u64(a.len() as u64);
                for x in a {
                    self.0.extend_from_slice(&x.to_le_bytes());
                }
            }
        }
    }
    fn pad(&mut self) {
        while self.0.len() % ALIGN != 0 {
            self.0.push(0);
        }
    }
}

/// A small deterministic generator (xorshift), so every run writes the same model.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        // Uniform in [-1, 1).
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn fill(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }
}

const CHAT_TEMPLATE: &str = "{% for message in messages %}<|im_start|>{{ message['role'] }}\n\
{{ message['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n\
{% endif %}";

fn printable(token: usize) -> bool {
    // Byte tokens start at 3: token 3 + b is the byte b.
    token >= 3 && (0x20..0x7f).contains(&(token - 3))
}

fn ends_sentence(token: usize) -> bool {
    token >= 3 && b".!?;,".contains(&((token - 3) as u8))
}

/// Writes the model to `path`.
pub fn write(path: &Path) -> std::io::Result<()> {
    let mut tokens = vec!["<unk>".to_string(), "<s>".to_string(), "</s>".to_string()];
    let mut types = vec![2, 3, 3];
    for b in 0..=255u32 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
    }
    let scores = vec![0.0f32; N_VOCAB];
    let meta: Vec<(&str, Val)> = vec![
        ("general.architecture", Val::Str("llama".into())),
        ("general.name", Val::Str("omniflow-test-tiny".into())),
        ("general.alignment", Val::U32(ALIGN as u32)),
        ("llama.context_length", Val::U32(CONTEXT)),
        ("llama.embedding_length", Val::U32(N_EMBD as u32)),
        ("llama.block_count", Val::U32(N_LAYER as u32)),
        ("llama.feed_forward_length", Val::U32(N_FF as u32)),
        ("llama.attention.head_count", Val::U32(N_HEAD)),
        ("llama.attention.head_count_kv", Val::U32(N_HEAD)),
        ("llama.attention.layer_norm_rms_epsilon", Val::F32(1e-5)),
        (
            "llama.rope.dimension_count",
            Val::U32(N_EMBD as u32 / N_HEAD),
        ),
        ("llama.vocab_size", Val::U32(N_VOCAB as u32)),
        ("tokenizer.ggml.model", Val::Str("llama".into())),
        ("tokenizer.ggml.tokens", Val::Strs(tokens)),
        ("tokenizer.ggml.scores", Val::F32s(scores)),
        ("tokenizer.ggml.token_type", Val::I32s(types)),
        ("tokenizer.ggml.unknown_token_id", Val::U32(0)),
        ("tokenizer.ggml.bos_token_id", Val::U32(1)),
        ("tokenizer.ggml.eos_token_id", Val::U32(EOS)),
        ("tokenizer.ggml.add_bos_token", Val::Bool(true)),
        ("tokenizer.ggml.add_space_prefix", Val::Bool(false)),
        ("tokenizer.chat_template", Val::Str(CHAT_TEMPLATE.into())),
    ];

    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    // Embeddings: first component 1, the second 1 for the bytes that end a sentence (0
    // elsewhere), the rest small noise.
    let mut embd = rng.fill(N_EMBD * N_VOCAB, 0.05);
    for t in 0..N_VOCAB {
        embd[t * N_EMBD] = 1.0;
        embd[t * N_EMBD + 1] = if ends_sentence(t) { 1.0 } else { 0.0 };
    }
    tensors.push(("token_embd.weight".into(), vec![N_EMBD, N_VOCAB], embd));
    for l in 0..N_LAYER {
        let p = |n: &str| format!("blk.{l}.{n}.weight");
        tensors.push((p("attn_norm"), vec![N_EMBD], vec![1.0; N_EMBD]));
        for n in ["attn_q", "attn_k", "attn_v", "attn_output"] {
            tensors.push((p(n), vec![N_EMBD, N_EMBD], rng.fill(N_EMBD * N_EMBD, 0.02)));
        }
        tensors.push((p("ffn_norm"), vec![N_EMBD], vec![1.0; N_EMBD]));
        tensors.push((
            p("ffn_gate"),
            vec![N_EMBD, N_FF],
            rng.fill(N_EMBD * N_FF, 0.02),
        ));
        tensors.push((
            p("ffn_up"),
            vec![N_EMBD, N_FF],
            rng.fill(N_EMBD * N_FF, 0.02),
        ));
        tensors.push((
            p("ffn_down"),
            vec![N_FF, N_EMBD],
            rng.fill(N_FF * N_EMBD, 0.02),
        ));
    }
    tensors.push(("output_norm.weight".into(), vec![N_EMBD], vec![1.0; N_EMBD]));
    // Output: the first component (about sqrt(N_EMBD) after the norm) lifts the printable bytes
    // well above the rest; the noise picks among them. The end token is lifted by the second
    // component only, so an answer ends right after a byte that ends a sentence (about one in
    // 19) and never before its first byte: no empty answers.
    let mut out = rng.fill(N_EMBD * N_VOCAB, 0.3);
    for t in 0..N_VOCAB {
        let (first, second) = if t == EOS as usize {
            (-1.0, 3.0)
        } else if printable(t) {
            (0.5, 0.0)
        } else {
            (-1.0, 0.0)
        };
        out[t * N_EMBD] = first;
        out[t * N_EMBD + 1] = second;
    }
    tensors.push(("output.weight".into(), vec![N_EMBD, N_VOCAB], out));

    let mut o = Out(Vec::new());
    o.0.extend_from_slice(b"GGUF");
    o.u32(3);
    o.u64(tensors.len() as u64);
    o.u64(meta.len() as u64);
    for (k, v) in &meta {
        o.str(k);
        o.val(v);
    }
    let mut offset = 0usize;
    for (name, dims, data) in &tensors {
        o.str(name);
        o.u32(dims.len() as u32);
        for d in dims {
            o.u64(*d as u64);
        }
        o.u32(0); // F32
        o.u64(offset as u64);
        offset += (data.len() * 4).div_ceil(ALIGN) * ALIGN;
    }
    o.pad();
    for (_, _, data) in &tensors {
        for x in data {
            o.0.extend_from_slice(&x.to_le_bytes());
        }
        o.pad();
    }
    std::fs::write(path, o.0)
}
