//! Tokenization against the Python `tokenizers`/transformers outputs recorded by
//! `tools/make_fixtures.py`: ids, decoding with and without special tokens, the chat template and
//! `<image>` expansion, and the errors around them.

mod common;

use common::{fixture_dir, Expected};
use fastrm::text::{chat_prompt, TextProcessor};

fn tokenizer() -> TextProcessor {
    TextProcessor::from_file(&fixture_dir("tiny").join("tokenizer.json")).unwrap()
}

#[test]
fn ids_and_decoding_match_transformers() {
    let cases: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_dir("tokenizer_cases.json")).unwrap(),
    )
    .unwrap();
    let tok = tokenizer();
    let cases = cases["cases"].as_array().unwrap();
    assert!(cases.len() >= 5);
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let want: Vec<u32> = c["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode(text).unwrap(), want, "ids of {text:?}");
        assert_eq!(
            tok.decode(&want).unwrap(),
            c["decoded_skip_special"].as_str().unwrap(),
            "decode of {text:?}"
        );
    }
}

#[test]
fn template_and_image_expansion() {
    let exp = Expected::load("clip336");
    let question = &exp.meta["question"];
    assert_eq!(exp.meta["prompt"], chat_prompt(question));
    let image_id: u32 = exp.meta["image_token_id"].parse().unwrap();
    let ids = tokenizer().prompt_ids(question, image_id, 576).unwrap();
    assert_eq!(ids, exp.ids("input_ids"));
    assert_eq!(ids.iter().filter(|&&i| i == image_id).count(), 576);
}

#[test]
fn errors() {
    let tok = tokenizer();
    let e = tok.prompt_ids("what?", 7, 4).unwrap_err().to_string();
    assert!(
        e.contains("<image> has id 512") && e.contains("says 7"),
        "{e}"
    );
    assert!(tok.prompt_ids("  ", 512, 4).is_err());
    assert!(tok.prompt_ids("a <image> b", 512, 4).is_err());
    let missing = fixture_dir("tiny").join("no-such-tokenizer.json");
    let e = TextProcessor::from_file(&missing)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("no-such-tokenizer.json") && e.contains("not found"),
        "{e}"
    );
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("tokenizer.json");
    std::fs::write(&bad, "{\"model\": 3}").unwrap();
    let e = TextProcessor::from_file(&bad).err().unwrap().to_string();
    assert!(e.contains("cannot load"), "{e}");
}
