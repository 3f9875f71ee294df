//! CLIP BPE tokenizer, as transformers' CLIPTokenizer (transformers 5, backed by the
//! `tokenizers` library), step for step:
//!
//! 1. special ("added") tokens are cut out of the raw text first (`<|startoftext|>`,
//!    `<|endoftext|>`, and the pad token: SD 2 pads with `!`, so every `!` in a prompt
//!    becomes id 0 there); tokens marked `normalized` are cut out after step 2 instead;
//! 2. normalisation: Unicode NFC (with the `tokenizers` library's Unicode 9 tables), every run of whitespace -> one space, per-character
//!    lower-casing (no ftfy, no HTML unescaping, no accent stripping);
//! 3. pre-tokenisation: CLIP's regex keeps words, single digits, contractions and
//!    punctuation runs, dropping whitespace; each piece is then split again by GPT-2's
//!    byte-level regex (which only matters for a lower-cased `<|ENDOFTEXT|>` typed as text);
//! 4. each piece's UTF-8 bytes map to printable characters (GPT-2's byte-to-unicode table)
//!    and are merged by BPE rank, the last character carrying the `</w>` word end.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use anyhow::{anyhow, bail, Context, Result};
use regex::Regex;
use serde_json::Value;
use unicode_normalization_alignments::UnicodeNormalization;

/// OpenAI's merges file, vendored (see assets/README.md for origin and license).
const OPENAI_BPE_GZ: &[u8] = include_bytes!("../assets/bpe_simple_vocab_16e6.txt.gz");
/// OpenAI keeps the first 49152 - 256 - 2 merges of the file.
const OPENAI_MERGES: usize = 49152 - 256 - 2;

const START_OF_TEXT: &str = "<|startoftext|>";
const END_OF_TEXT: &str = "<|endoftext|>";
const WORD_END: &str = "</w>";

/// CLIP's pre-tokenizer pattern (transformers' `CLIPTokenizer`).
const CLIP_PATTERN: &str = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
/// GPT-2's byte-level pattern as it acts on text without whitespace (the pieces CLIP's
/// pattern leaves): the optional leading space and the whitespace alternatives drop out.
const BYTE_LEVEL_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}+|[^\s\p{L}\p{N}]+";

/// Past this many cached words the cache starts over (a guard for endless prompt streams).
const CACHE_LIMIT: usize = 100_000;

/// A token matched as a whole before BPE (the special tokens).
#[derive(Debug, Clone)]
struct AddedToken {
    content: String,
    id: u32,
    /// Matched in the normalised text (true) or in the raw text (false).
    normalized: bool,
}

pub struct ClipTokenizer {
    encoder: HashMap<String, u32>,
    /// (left id, right id) -> (rank, merged id)
    merges: HashMap<(u32, u32), (u32, u32)>,
    byte_chars: [char; 256],
    clip_pattern: Regex,
    byte_level_pattern: Regex,
    added: Vec<AddedToken>,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    unk_id: Option<u32>,
    /// BPE result per byte-level piece.
    cache: Mutex<HashMap<String, Vec<u32>>>,
}

impl Clone for ClipTokenizer {
    /// A copy with an empty word cache.
    fn clone(&self) -> Self {
        ClipTokenizer {
            encoder: self.encoder.clone(),
            merges: self.merges.clone(),
            byte_chars: self.byte_chars,
            clip_pattern: self.clip_pattern.clone(),
            byte_level_pattern: self.byte_level_pattern.clone(),
            added: self.added.clone(),
            bos_id: self.bos_id,
            eos_id: self.eos_id,
            pad_id: self.pad_id,
            unk_id: self.unk_id,
            cache: Mutex::new(HashMap::new()),
        }
    }
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("merges", &self.merges.len())
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

/// GPT-2's reversible byte -> printable character table, in its own order (the order
/// OpenAI's vocabulary lists the single characters in).
fn bytes_to_unicode() -> Vec<(u8, char)> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut table: Vec<(u8, char)> = (0u32..256).filter(|&b| printable(b)).map(|b| (b as u8, char::from_u32(b).unwrap_or('?'))).collect();
    let mut next = 256u32;
    for b in 0u32..256 {
        if !printable(b) {
            table.push((b as u8, char::from_u32(next).unwrap_or('?')));
            next += 1;
        }
    }
    table
}

/// Leftmost-longest split of `text` on the given tokens (as the `tokenizers` library's
/// added-vocabulary matcher does).
enum Segment<'a> {
    Text(&'a str),
    Token(u32),
}

fn split_on_tokens<'a>(text: &'a str, tokens: &[(String, u32)]) -> Vec<Segment<'a>> {
    let mut out = Vec::new();
    if tokens.is_empty() {
        out.push(Segment::Text(text));
        return out;
    }
    let mut plain_start = 0;
    let mut i = 0;
    while i < text.len() {
        let rest = &text[i..];
        let best = tokens.iter().filter(|(content, _)| !content.is_empty() && rest.starts_with(content.as_str())).max_by_key(|(content, _)| content.len());
        match best {
            Some((content, id)) => {
                if plain_start < i {
                    out.push(Segment::Text(&text[plain_start..i]));
                }
                out.push(Segment::Token(*id));
                i += content.len();
                plain_start = i;
            }
            None => i += rest.chars().next().map_or(1, char::len_utf8),
        }
    }
    if plain_start < text.len() {
        out.push(Segment::Text(&text[plain_start..]));
    }
    out
}

/// transformers' CLIP normaliser: NFC, whitespace runs -> " ", per-character lower case.
fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_space = false;
    // The `tokenizers` library's own NFC (Unicode 9 tables): newer tables compose and
    // reorder marks of scripts added since, where transformers does not.
    for (c, _) in text.nfc() {
        if c.is_whitespace() {
            if !in_space {
                out.push(' ');
            }
            in_space = true;
            continue;
        }
        in_space = false;
        // Character by character, as `tokenizers` does: no final-sigma rule.
        out.extend(c.to_lowercase());
    }
    out
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| anyhow!("{} is not valid JSON ({e})", path.display()))
}

/// A special-token entry of special_tokens_map.json / tokenizer_config.json: a string or
/// an AddedToken object. Strings are matched in the raw text (transformers 5 makes them
/// `normalized=False`); objects say for themselves.
fn special_entry(value: &Value) -> Option<(String, bool)> {
    match value {
        Value::String(s) => Some((s.clone(), false)),
        Value::Object(o) => {
            let content = o.get("content")?.as_str()?.to_string();
            let normalized = o.get("normalized").and_then(Value::as_bool).unwrap_or(false);
            Some((content, normalized))
        }
        _ => None,
    }
}

impl ClipTokenizer {
    /// From a model folder's tokenizer/ (vocab.json + merges.txt, pad token from
    /// special_tokens_map.json / tokenizer_config.json). A folder with only a
    /// tokenizer.json is read from that instead.
    pub fn from_folder(dir: &Path) -> Result<Self> {
        let vocab_path = dir.join("vocab.json");
        let merges_path = dir.join("merges.txt");
        let tokenizer_json_path = dir.join("tokenizer.json");
        let (vocab, merge_lines, mut added_decl) = if vocab_path.is_file() {
            if !merges_path.is_file() {
                bail!("tokenizer folder {} has no merges.txt", dir.display());
            }
            let vocab = parse_vocab(&read_json(&vocab_path)?, &vocab_path)?;
            let text = std::fs::read_to_string(&merges_path).with_context(|| format!("cannot read {}", merges_path.display()))?;
            let merges = parse_merges_txt(&text, &merges_path)?;
            (vocab, merges, Vec::new())
        } else if tokenizer_json_path.is_file() {
            read_tokenizer_json(&tokenizer_json_path)?
        } else {
            bail!("tokenizer folder {} has no vocab.json", dir.display());
        };

        // Special tokens: special_tokens_map.json wins over tokenizer_config.json.
        let map_path = dir.join("special_tokens_map.json");
        let config_path = dir.join("tokenizer_config.json");
        let map = if map_path.is_file() { Some(read_json(&map_path)?) } else { None };
        let config = if config_path.is_file() { Some(read_json(&config_path)?) } else { None };
        let special = |key: &str, default: &str| -> (String, bool) {
            [map.as_ref(), config.as_ref()]
                .into_iter()
                .flatten()
                .find_map(|json| json.get(key).and_then(special_entry))
                .unwrap_or_else(|| (default.to_string(), false))
        };
        let bos = special("bos_token", START_OF_TEXT);
        let eos = special("eos_token", END_OF_TEXT);
        let unk = special("unk_token", END_OF_TEXT);
        let pad = special("pad_token", END_OF_TEXT);
        // Tokens the config declares with their id (transformers >= 4.34 writes these).
        if let Some(decoder) = config.as_ref().and_then(|c| c.get("added_tokens_decoder")).and_then(Value::as_object) {
            for (id, entry) in decoder {
                let id: u32 = id.parse().map_err(|_| anyhow!("{}: added_tokens_decoder id {id:?} is not a number", config_path.display()))?;
                if let Some((content, normalized)) = special_entry(entry) {
                    added_decl.push((content, Some(id), normalized));
                }
            }
        }
        // The special-token entries decide how their tokens match; declared ones follow.
        let mut declared: Vec<(String, Option<u32>, bool)> = [&bos, &eos, &unk, &pad].into_iter().map(|(c, n)| (c.clone(), None, *n)).collect();
        declared.extend(added_decl);

        let source = dir.display().to_string();
        Self::build(vocab, &merge_lines, &declared, &bos.0, &eos.0, &unk.0, &pad.0, &source)
    }

    /// OpenAI's standard vocabulary, built in (so single-file checkpoints work offline);
    /// pad = <|endoftext|>.
    pub fn openai() -> Result<Self> {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(OPENAI_BPE_GZ), &mut text).context("the built-in CLIP vocabulary cannot be decompressed")?;
        let lines: Vec<&str> = text.split('\n').collect();
        let merge_lines = lines.get(1..OPENAI_MERGES + 1).ok_or_else(|| anyhow!("the built-in CLIP vocabulary is truncated"))?;
        let mut merges = Vec::with_capacity(OPENAI_MERGES);
        for line in merge_lines {
            let mut parts = line.split_whitespace();
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) => merges.push((a.to_string(), b.to_string())),
                _ => bail!("the built-in CLIP vocabulary has a malformed merge {line:?}"),
            }
        }
        // OpenAI's order: the byte characters, the same with a word end, the merges, the specials.
        let chars: Vec<char> = bytes_to_unicode().into_iter().map(|(_, c)| c).collect();
        let mut tokens: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
        tokens.extend(chars.iter().map(|c| format!("{c}{WORD_END}")));
        tokens.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        tokens.push(START_OF_TEXT.to_string());
        tokens.push(END_OF_TEXT.to_string());
        let vocab: HashMap<String, u32> = tokens.into_iter().enumerate().map(|(i, t)| (t, i as u32)).collect();
        let declared = vec![(START_OF_TEXT.to_string(), None, false), (END_OF_TEXT.to_string(), None, false)];
        Self::build(vocab, &merges, &declared, START_OF_TEXT, END_OF_TEXT, END_OF_TEXT, END_OF_TEXT, "the built-in CLIP vocabulary")
    }

    /// With a different pad token (SD 2 single files pad with "!"). As in transformers,
    /// the pad token becomes a special token: it is matched as a whole in prompts too.
    pub fn with_pad_token(mut self, token: &str) -> Result<Self> {
        let id = self.id_of_special(token).ok_or_else(|| anyhow!("pad token {token:?} is not in the tokenizer's vocabulary"))?;
        if !self.added.iter().any(|a| a.content == token) {
            self.added.push(AddedToken { content: token.to_string(), id, normalized: false });
        }
        self.pad_id = id;
        self.clear_cache();
        Ok(self)
    }

    /// Ids with start and end tokens, truncated to max_len (end token kept), padded with
    /// the pad id to max_len.
    pub fn encode_padded(&self, text: &str, max_len: usize) -> Vec<i64> {
        let mut body = self.encode_body(text);
        body.truncate(max_len.saturating_sub(2));
        let mut ids = Vec::with_capacity(max_len);
        ids.push(self.bos_id as i64);
        ids.extend(body.into_iter().map(i64::from));
        ids.push(self.eos_id as i64);
        // Fewer than two positions cannot hold both ends: keep the start.
        ids.truncate(max_len);
        ids.resize(max_len, self.pad_id as i64);
        ids
    }

    /// Ids for a text encoder of `positions` positions (77) that reads
    /// `max_token_length` tokens (75, 150, 225) in windows: the text truncated to
    /// `max_token_length` and padded, then cut into windows of `positions - 2`
    /// tokens (`max_token_length` a multiple of that), each between the start token and the
    /// sequence's last token, as kohya's trainers lay them out. Where the pad
    /// token is not the end token (SD 2.x), a window whose text runs to its end
    /// gets the end token and an empty window starts with it. One window or less:
    /// [`encode_padded`](Self::encode_padded) with `positions`.
    pub fn encode_chunked(&self, text: &str, max_token_length: usize, positions: usize) -> Vec<i64> {
        let body = positions.saturating_sub(2).max(1);
        if max_token_length <= body {
            return self.encode_padded(text, positions);
        }
        let ids = self.encode_padded(text, max_token_length + 2);
        let (bos, last) = (ids[0], ids[ids.len() - 1]);
        let (eos, pad) = (self.eos_id(), self.pad_id());
        let mut out = Vec::with_capacity(max_token_length / body * (body + 2));
        for start in (1..=max_token_length - body + 1).step_by(body) {
            let mut window = Vec::with_capacity(body + 2);
            window.push(bos);
            window.extend_from_slice(&ids[start..start + body]);
            window.push(last);
            if pad != eos {
                if window[body] != eos && window[body] != pad {
                    window[body + 1] = eos;
                }
                if window[1] == pad {
                    window[1] = eos;
                }
            }
            out.extend(window);
        }
        out
    }

    /// Ids with start/end, no padding, no truncation.
    pub fn encode(&self, text: &str) -> Vec<i64> {
        let body = self.encode_body(text);
        let mut ids = Vec::with_capacity(body.len() + 2);
        ids.push(self.bos_id as i64);
        ids.extend(body.into_iter().map(i64::from));
        ids.push(self.eos_id as i64);
        ids
    }

    pub fn pad_id(&self) -> i64 {
        self.pad_id as i64
    }
    pub fn bos_id(&self) -> i64 {
        self.bos_id as i64
    }
    pub fn eos_id(&self) -> i64 {
        self.eos_id as i64
    }

    /// Number of ids (the vocabulary plus any special token it lacked).
    pub fn vocab_size(&self) -> usize {
        let top = self.encoder.values().chain(self.added.iter().map(|a| &a.id)).max();
        top.map_or(0, |&m| m as usize + 1).max(self.encoder.len())
    }

    /// Id of a single token string if it is in the vocabulary (e.g. "sks</w>").
    pub fn token_id(&self, token: &str) -> Option<i64> {
        self.encoder.get(token).or_else(|| self.added.iter().find(|a| a.content == token).map(|a| &a.id)).map(|&id| id as i64)
    }

    // ---------------------------------------------------------------------------------

    #[allow(clippy::too_many_arguments)]
    fn build(
        encoder: HashMap<String, u32>,
        merge_pairs: &[(String, String)],
        declared: &[(String, Option<u32>, bool)],
        bos: &str,
        eos: &str,
        unk: &str,
        pad: &str,
        source: &str,
    ) -> Result<Self> {
        let mut merges = HashMap::with_capacity(merge_pairs.len());
        for (rank, (a, b)) in merge_pairs.iter().enumerate() {
            let merged = format!("{a}{b}");
            let (Some(&left), Some(&right), Some(&new)) = (encoder.get(a), encoder.get(b), encoder.get(&merged)) else {
                bail!("{source}: merge {} ({a:?} {b:?}) uses or makes a token that is not in the vocabulary", rank + 1);
            };
            // A repeated merge keeps its last rank, as the `tokenizers` library does.
            merges.insert((left, right), (rank as u32, new));
        }
        let byte_table = bytes_to_unicode();
        let mut byte_chars = ['\0'; 256];
        for (b, c) in byte_table {
            byte_chars[b as usize] = c;
        }
        let mut tokenizer = ClipTokenizer {
            encoder,
            merges,
            byte_chars,
            clip_pattern: Regex::new(CLIP_PATTERN).context("CLIP pattern")?,
            byte_level_pattern: Regex::new(BYTE_LEVEL_PATTERN).context("byte-level pattern")?,
            added: Vec::new(),
            bos_id: 0,
            eos_id: 0,
            pad_id: 0,
            unk_id: None,
            cache: Mutex::new(HashMap::new()),
        };
        // Specials missing from the vocabulary get new ids after it, as transformers adds them.
        let mut next_id = tokenizer.vocab_size() as u32;
        for (content, id, normalized) in declared {
            if content.is_empty() || tokenizer.added.iter().any(|a| &a.content == content) {
                continue;
            }
            let id = match id.or_else(|| tokenizer.encoder.get(content).copied()) {
                Some(id) => id,
                None => {
                    next_id += 1;
                    next_id - 1
                }
            };
            let content = if *normalized { normalize(content) } else { content.clone() };
            tokenizer.added.push(AddedToken { content, id, normalized: *normalized });
        }
        let need = |name: &str, token: &str| tokenizer.id_of_special(token).ok_or_else(|| anyhow!("{source}: the {name} token {token:?} is not in the vocabulary"));
        let bos_id = need("start", bos)?;
        let eos_id = need("end", eos)?;
        let pad_id = need("pad", pad)?;
        tokenizer.bos_id = bos_id;
        tokenizer.eos_id = eos_id;
        tokenizer.pad_id = pad_id;
        tokenizer.unk_id = tokenizer.id_of_special(unk);
        Ok(tokenizer)
    }

    fn id_of_special(&self, token: &str) -> Option<u32> {
        self.added.iter().find(|a| a.content == token).map(|a| a.id).or_else(|| self.encoder.get(token).copied())
    }

    fn clear_cache(&self) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.clear();
        }
    }

    /// The ids of `text` without start/end tokens.
    fn encode_body(&self, text: &str) -> Vec<u32> {
        let raw_tokens: Vec<(String, u32)> = self.added.iter().filter(|a| !a.normalized).map(|a| (a.content.clone(), a.id)).collect();
        let normalized_tokens: Vec<(String, u32)> = self.added.iter().filter(|a| a.normalized).map(|a| (a.content.clone(), a.id)).collect();
        let mut ids = Vec::new();
        for segment in split_on_tokens(text, &raw_tokens) {
            match segment {
                Segment::Token(id) => ids.push(id),
                Segment::Text(raw) => {
                    let normalized = normalize(raw);
                    for inner in split_on_tokens(&normalized, &normalized_tokens) {
                        match inner {
                            Segment::Token(id) => ids.push(id),
                            Segment::Text(words) => self.encode_words(words, &mut ids),
                        }
                    }
                }
            }
        }
        ids
    }

    /// Pre-tokenise normalised text and BPE each piece.
    fn encode_words(&self, text: &str, ids: &mut Vec<u32>) {
        for clip_piece in self.clip_pattern.find_iter(text) {
            for piece in self.byte_level_pattern.find_iter(clip_piece.as_str()) {
                let mapped: String = piece.as_str().bytes().map(|b| self.byte_chars[b as usize]).collect();
                ids.extend(self.bpe_cached(&mapped));
            }
        }
    }

    fn bpe_cached(&self, word: &str) -> Vec<u32> {
        if let Ok(cache) = self.cache.lock() {
            if let Some(hit) = cache.get(word) {
                return hit.clone();
            }
        }
        let ids = self.bpe(word);
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= CACHE_LIMIT {
                cache.clear();
            }
            cache.insert(word.to_string(), ids.clone());
        }
        ids
    }

    /// Byte-pair merging of one byte-level word: always the lowest-ranked adjacent pair
    /// first, the leftmost one among equals (the `tokenizers` library's order).
    fn bpe(&self, word: &str) -> Vec<u32> {
        let chars: Vec<char> = word.chars().collect();
        let mut symbols: Vec<u32> = Vec::with_capacity(chars.len());
        let mut buf = String::new();
        for (i, c) in chars.iter().enumerate() {
            buf.clear();
            buf.push(*c);
            if i + 1 == chars.len() {
                buf.push_str(WORD_END);
            }
            // Characters outside the vocabulary become the unknown token, one each.
            if let Some(id) = self.encoder.get(buf.as_str()).copied().or(self.unk_id) {
                symbols.push(id);
            }
        }
        loop {
            let best = symbols
                .windows(2)
                .enumerate()
                .filter_map(|(pos, pair)| self.merges.get(&(pair[0], pair[1])).map(|&(rank, merged)| (rank, pos, merged)))
                .min_by_key(|&(rank, pos, _)| (rank, pos));
            let Some((_, pos, merged)) = best else { break };
            symbols[pos] = merged;
            symbols.remove(pos + 1);
        }
        symbols
    }
}

fn parse_vocab(json: &Value, path: &Path) -> Result<HashMap<String, u32>> {
    let object = json.as_object().ok_or_else(|| anyhow!("{} is not a JSON object of token -> id", path.display()))?;
    let mut vocab = HashMap::with_capacity(object.len());
    for (token, id) in object {
        let id = id.as_u64().filter(|&id| id < u32::MAX as u64).ok_or_else(|| anyhow!("{}: the id of token {token:?} is not a non-negative integer", path.display()))?;
        vocab.insert(token.clone(), id as u32);
    }
    Ok(vocab)
}

/// merges.txt: an optional `#version` line, then one "left right" pair a line.
fn parse_merges_txt(text: &str, path: &Path) -> Result<Vec<(String, String)>> {
    let mut merges = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if (n == 0 && line.starts_with("#version")) || line.is_empty() {
            continue;
        }
        let mut parts = line.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => merges.push((a.to_string(), b.to_string())),
            _ => bail!("{} line {}: {line:?} is not a pair of tokens", path.display(), n + 1),
        }
    }
    Ok(merges)
}

/// vocab, merges and declared added tokens from a `tokenizers` tokenizer.json.
#[allow(clippy::type_complexity)]
fn read_tokenizer_json(path: &Path) -> Result<(HashMap<String, u32>, Vec<(String, String)>, Vec<(String, Option<u32>, bool)>)> {
    let json = read_json(path)?;
    let model = json.get("model").ok_or_else(|| anyhow!("{} has no \"model\"", path.display()))?;
    let vocab = parse_vocab(model.get("vocab").unwrap_or(&Value::Null), path)?;
    let mut merges = Vec::new();
    for (n, merge) in model.get("merges").and_then(Value::as_array).ok_or_else(|| anyhow!("{} has no model.merges list", path.display()))?.iter().enumerate() {
        let pair = match merge {
            Value::String(s) => s.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())),
            Value::Array(a) if a.len() == 2 => match (a[0].as_str(), a[1].as_str()) {
                (Some(x), Some(y)) => Some((x.to_string(), y.to_string())),
                _ => None,
            },
            _ => None,
        };
        merges.push(pair.ok_or_else(|| anyhow!("{}: model.merges entry {} is not a pair of tokens", path.display(), n + 1))?);
    }
    let mut added = Vec::new();
    for entry in json.get("added_tokens").and_then(Value::as_array).into_iter().flatten() {
        if let (Some(content), Some(id)) = (entry.get("content").and_then(Value::as_str), entry.get("id").and_then(Value::as_u64)) {
            let normalized = entry.get("normalized").and_then(Value::as_bool).unwrap_or(false);
            added.push((content.to_string(), u32::try_from(id).ok(), normalized));
        }
    }
    Ok((vocab, merges, added))
}

impl ClipTokenizer {
    /// Writes this tokenizer as a transformers tokenizer folder (`vocab.json`,
    /// `merges.txt`, `special_tokens_map.json`, `tokenizer_config.json`), so a
    /// model folder we write loads in transformers and in `from_folder`.
    pub fn save_folder(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut by_id: Vec<(&String, &u32)> = self.encoder.iter().collect();
        by_id.sort_by_key(|(_, id)| **id);
        let id_to_token: HashMap<u32, &str> = by_id.iter().map(|(t, id)| (**id, t.as_str())).collect();
        let vocab: serde_json::Map<String, Value> =
            by_id.iter().map(|(t, id)| ((*t).clone(), Value::from(**id))).collect();
        let vocab_path = dir.join("vocab.json");
        std::fs::write(&vocab_path, serde_json::to_string(&Value::Object(vocab))?)
            .with_context(|| format!("cannot write {}", vocab_path.display()))?;

        let mut merges: Vec<(&(u32, u32), &(u32, u32))> = self.merges.iter().collect();
        merges.sort_by_key(|(_, (rank, _))| *rank);
        let mut text = String::from("#version: 0.2\n");
        for ((left, right), _) in merges {
            let (Some(l), Some(r)) = (id_to_token.get(left), id_to_token.get(right)) else {
                bail!("the tokenizer's merges name an id that is not in its vocabulary");
            };
            text.push_str(&format!("{l} {r}\n"));
        }
        let merges_path = dir.join("merges.txt");
        std::fs::write(&merges_path, text).with_context(|| format!("cannot write {}", merges_path.display()))?;

        let token = |id: u32| id_to_token.get(&id).map(|s| s.to_string()).unwrap_or_default();
        let unk = self.unk_id.map(token).unwrap_or_else(|| token(self.eos_id));
        let specials = serde_json::json!({
            "bos_token": token(self.bos_id),
            "eos_token": token(self.eos_id),
            "unk_token": unk,
            "pad_token": token(self.pad_id),
        });
        let map_path = dir.join("special_tokens_map.json");
        std::fs::write(&map_path, serde_json::to_string_pretty(&specials)?)
            .with_context(|| format!("cannot write {}", map_path.display()))?;
        let mut config = specials;
        config["model_max_length"] = Value::from(77);
        config["do_lower_case"] = Value::from(true);
        config["tokenizer_class"] = Value::from("CLIPTokenizer");
        let config_path = dir.join("tokenizer_config.json");
        std::fs::write(&config_path, serde_json::to_string_pretty(&config)?)
            .with_context(|| format!("cannot write {}", config_path.display()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_like_transformers() {
        assert_eq!(normalize("A\t\nB  C\u{3000}d"), "a b c d");
        assert_eq!(normalize("cafe\u{301}"), "caf\u{e9}");
        // No final-sigma rule: character-wise lower case.
        assert_eq!(normalize("ΟΔΟΣ"), "οδοσ");
    }

    #[test]
    fn byte_table_is_a_bijection() {
        let table = bytes_to_unicode();
        assert_eq!(table.len(), 256);
        let chars: std::collections::HashSet<char> = table.iter().map(|(_, c)| *c).collect();
        assert_eq!(chars.len(), 256);
        assert_eq!(table[0], (b'!', '!'));
        assert!(table.iter().any(|&(b, c)| b == b' ' && c == '\u{120}'));
    }

    #[test]
    fn openai_basics() {
        let tok = ClipTokenizer::openai().unwrap();
        assert_eq!(tok.vocab_size(), 49408);
        assert_eq!((tok.bos_id(), tok.eos_id(), tok.pad_id()), (49406, 49407, 49407));
        assert_eq!(tok.encode("a photo of a cat"), vec![49406, 320, 1125, 539, 320, 2368, 49407]);
        assert_eq!(tok.token_id("a</w>"), Some(320));
    }

    #[test]
    fn padding_and_truncation() {
        let tok = ClipTokenizer::openai().unwrap();
        let ids = tok.encode_padded("a cat", 6);
        assert_eq!(ids, vec![49406, 320, 2368, 49407, 49407, 49407]);
        let long = "cat ".repeat(100);
        let ids = tok.encode_padded(&long, 77);
        assert_eq!(ids.len(), 77);
        assert_eq!(ids[76], 49407);
        assert_eq!(ids[75], 2368);
        let sd2 = ClipTokenizer::openai().unwrap().with_pad_token("!").unwrap();
        assert_eq!(sd2.encode_padded("a cat!", 6), vec![49406, 320, 2368, 0, 49407, 0]);
    }
}
