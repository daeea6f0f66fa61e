//! The worked `redis-cli FCALL` examples of `lua/README.md` (one at least per
//! function of the library) run, in order, on this binary's own empty
//! redis-server, and give the documented replies.

mod common;

use std::path::Path;

use common::redis::RedisServer;

/// Pairs of (```sh block, the ```text block right after it).
fn examples(readme: &str) -> Vec<(String, String)> {
    let mut out = vec![];
    let mut rest = readme;
    while let Some(i) = rest.find("```sh\n") {
        let body = &rest[i + 6..];
        let end = body.find("```\n").expect("closed sh block");
        let command = body[..end].to_string();
        let after = &body[end + 4..];
        let after_trim = after.trim_start_matches('\n');
        let expected = after_trim
            .strip_prefix("```text\n")
            .and_then(|t| t.find("```\n").map(|e| t[..e].to_string()))
            .expect("a ```text block follows each ```sh block");
        out.push((command, expected));
        rest = after;
    }
    out
}

#[test]
fn readme_examples_give_the_documented_replies() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("lua/README.md")).unwrap();
    let examples = examples(&readme);
    assert!(examples.len() >= 15, "found {} examples", examples.len());
    assert!(readme.contains(creditgate::engine::redis::LIBRARY_NAME));
    // A worked example for every function of the library.
    for f in creditgate::engine::redis::Functions::new().all() {
        assert!(
            examples
                .iter()
                .any(|(c, _)| c.contains(&format!("FCALL {f} "))),
            "no example calls {f}"
        );
    }
    let server = RedisServer::shared();
    assert_eq!(server.cli(&["FLUSHALL"]).trim(), "OK");
    assert_eq!(server.cli(&["FUNCTION", "FLUSH"]).trim(), "OK");
    for (command, expected) in examples {
        let got = server.sh(root, &command);
        if std::env::var_os("CG_PRINT_EXAMPLES").is_some() {
            println!("=====\n{command}-----\n{got}");
        }
        assert_eq!(got, expected, "example:\n{command}");
    }
}
