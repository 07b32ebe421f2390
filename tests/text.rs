//! Tokenization against the Python `tokenizers`/transformers outputs recorded by
//! `tools/make_fixtures.py`: ids, decoding with and without special tokens, the chat template and
//! `<image>` expansion, and the errors around them.

mod common;

use common::{fixture_dir, Expected};
use fastrm::text::{Role, TextProcessor, Turn};

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
    let turns = [Turn::new(Role::User, 1, question.as_str())];
    assert_eq!(exp.meta["prompt"], tokenizer().render_chat(&turns).unwrap());
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

/// Per-token pieces (what log-probabilities report): SentencePiece's `▁` is the space it stands
/// for, a byte-fallback token is its one raw byte, and a word's pieces add up to its text.
#[test]
fn token_pieces_keep_spaces_and_raw_bytes() {
    let t = tokenizer();
    assert_eq!(t.token_piece(305), (" the".to_string(), b" the".to_vec()));
    assert_eq!(t.token_piece(13), ("\n".to_string(), vec![b'\n']));
    // 0xE2 starts a three-byte character: alone it is not text.
    let e2 = (0..512u32)
        .find(|&id| t.token_piece(id).1 == [0xE2])
        .expect("a byte token for 0xE2");
    assert_eq!(t.token_piece(e2).0, "\u{FFFD}");
    assert_eq!(t.token_piece(2).0, "</s>");
    let ids = t.encode("the cat\nsat").unwrap();
    // Without the BOS the encoding starts with.
    let joined: Vec<u8> = ids
        .iter()
        .filter(|&&id| id != 1)
        .flat_map(|&id| t.token_piece(id).1)
        .collect();
    assert_eq!(
        String::from_utf8(joined).unwrap().trim_start(),
        "the cat\nsat"
    );
}
