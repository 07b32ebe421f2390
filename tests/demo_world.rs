//! The bundled demo model (`assets/demo/model`, trained on the demo world by
//! `tools/demo_world/train.py`) answers a sample of the committed evaluation set
//! (`assets/demo_world/eval`) exactly as HF transformers did: same prompt ids, same greedy ids
//! (EOS included), same decoded text. The oracle file is written by
//! `tools/demo_world/evaluate.py --expected tests/fixtures/demo_world/expected.json`.

use std::path::{Path, PathBuf};

use fastrm::backend::cpu::Cpu;
use fastrm::{Engine, GenerateOptions, Request};
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("id list")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

#[test]
fn demo_model_reproduces_transformers_answers() {
    let path = root().join("tests/fixtures/demo_world/expected.json");
    let exp: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let suffix = exp["suffix"].as_str().unwrap();
    let max_new = exp["max_new_tokens"].as_u64().unwrap() as usize;
    let eval_dir = root().join(exp["eval"].as_str().unwrap());
    let engine =
        Engine::load(Cpu, &root().join(exp["model"].as_str().unwrap())).expect("demo model loads");
    let opts = GenerateOptions {
        max_new_tokens: max_new,
        stop_at_eos: true,
        keep_steps: false,
        ..Default::default()
    };
    let cases = exp["cases"].as_array().unwrap();
    assert!(
        cases.len() >= 10,
        "expected.json has only {} cases",
        cases.len()
    );
    let mut correct = 0;
    for case in cases {
        let id = case["id"].as_str().unwrap();
        let question = format!("{}{}", case["question"].as_str().unwrap(), suffix);
        let image = eval_dir.join(case["image"].as_str().unwrap());
        let g = engine
            .generate(&Request::question(image, question.as_str()), &opts)
            .unwrap();
        assert_eq!(g.input_ids, ids(&case["input_ids"]), "{id}: prompt ids");
        assert_eq!(
            g.generated_ids,
            ids(&case["generated_ids"]),
            "{id}: generated ids for {question:?} (transformers said {:?}, min top-2 gap {})",
            case["generated_text"],
            case["min_top2_gap"]
        );
        assert_eq!(
            g.text,
            case["generated_text"].as_str().unwrap(),
            "{id}: text"
        );
        correct += case["correct"].as_bool().unwrap() as usize;
    }
    // The sample also tells a trained model from a random one (which answers ~none right); the
    // accuracies themselves are in tools/demo_world/README.md.
    assert!(
        correct * 2 >= cases.len(),
        "only {correct} of {} sampled answers are right: is assets/demo/model the trained model?",
        cases.len()
    );
}
