//! docker-compose.yml and the Dockerfile, checked without a Docker engine
//! (none runs in CI): the compose file is parsed and its settings checked,
//! the Dockerfile is read for what it builds and copies, the example
//! configuration is parsed with the environment compose gives it, and the
//! nginx configuration docs/gateways.md quotes is the tested one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use creditgate::config::Config;
use serde_yaml::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn compose() -> Value {
    let text = std::fs::read_to_string(root().join("docker-compose.yml"))
        .expect("docker-compose.yml at the repository root");
    serde_yaml::from_str(&text).expect("docker-compose.yml is valid YAML")
}

fn service<'a>(c: &'a Value, name: &str) -> &'a Value {
    let s = &c["services"][name];
    assert!(s.is_mapping(), "service {name:?} missing");
    s
}

/// A `command` as its words, whether written as a list or a string.
fn words(v: &Value) -> Vec<String> {
    match v {
        Value::Sequence(items) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => s.clone(),
                other => serde_yaml::to_string(other).unwrap().trim().to_string(),
            })
            .collect(),
        Value::String(s) => s.split_whitespace().map(str::to_string).collect(),
        Value::Null => vec![],
        other => panic!("unexpected command {other:?}"),
    }
}

/// `environment` as a map, whether written as a map or a `KEY=value` list.
fn environment(s: &Value) -> BTreeMap<String, String> {
    match &s["environment"] {
        Value::Mapping(m) => m
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    Value::String(s) => s.clone(),
                    other => serde_yaml::to_string(other).unwrap().trim().to_string(),
                };
                (k.as_str().unwrap().to_string(), v)
            })
            .collect(),
        Value::Sequence(items) => items
            .iter()
            .filter_map(|i| i.as_str()?.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// `--flag value` (or `--flag=value`) in a command.
fn flag(words: &[String], name: &str) -> Option<String> {
    let prefixed = format!("{name}=");
    words.iter().enumerate().find_map(|(i, w)| {
        if w == name {
            words.get(i + 1).cloned()
        } else {
            w.strip_prefix(&prefixed).map(str::to_string)
        }
    })
}

#[test]
fn redis_is_7x_with_append_only_persistence_and_no_eviction() {
    let c = compose();
    let redis = service(&c, "redis");
    let image = redis["image"].as_str().expect("redis image");
    let tag = image
        .strip_prefix("redis:")
        .expect("the official redis image");
    assert!(
        tag == "7" || tag.starts_with("7.") || tag.starts_with("7-"),
        "redis 7.x, got {image}"
    );
    let cmd = words(&redis["command"]);
    assert_eq!(
        cmd.first().map(String::as_str),
        Some("redis-server"),
        "{cmd:?}"
    );
    assert_eq!(
        flag(&cmd, "--appendonly").as_deref(),
        Some("yes"),
        "{cmd:?}"
    );
    assert_eq!(
        flag(&cmd, "--maxmemory-policy").as_deref(),
        Some("noeviction"),
        "{cmd:?}"
    );
}

/// The Dockerfile a service's `build` names, resolved from the repository.
fn dockerfile_of(s: &Value) -> PathBuf {
    let (context, file) = match &s["build"] {
        Value::String(ctx) => (ctx.clone(), "Dockerfile".to_string()),
        Value::Mapping(_) => (
            s["build"]["context"].as_str().unwrap_or(".").to_string(),
            s["build"]["dockerfile"]
                .as_str()
                .unwrap_or("Dockerfile")
                .to_string(),
        ),
        other => panic!("creditgate must be built from the repository, got build: {other:?}"),
    };
    root().join(context).join(file)
}

#[test]
fn creditgate_is_built_here_pointed_at_that_redis_with_the_example_config() {
    let c = compose();
    let cg = service(&c, "creditgate");
    let dockerfile = dockerfile_of(cg);
    assert_eq!(
        dockerfile.canonicalize().unwrap(),
        root().join("Dockerfile").canonicalize().unwrap(),
        "built from the repository's Dockerfile"
    );

    let env = environment(cg);
    let url = env
        .get("CREDITGATE_REDIS_URL")
        .expect("CREDITGATE_REDIS_URL set");
    let host = url
        .strip_prefix("redis://")
        .expect("a redis:// url")
        .split(['/', ':'])
        .next()
        .unwrap();
    assert_eq!(host, "redis", "points at the compose redis service: {url}");
    let depends = &cg["depends_on"];
    let on_redis = match depends {
        Value::Sequence(v) => v.iter().any(|d| d.as_str() == Some("redis")),
        Value::Mapping(m) => m.contains_key("redis"),
        _ => false,
    };
    assert!(on_redis, "depends_on redis: {depends:?}");

    // The example configuration is mounted where the command reads it.
    let mounted: Vec<(String, String)> = cg["volumes"]
        .as_sequence()
        .map(|v| v.iter().filter_map(|m| m.as_str()).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| {
            let mut parts = m.split(':');
            Some((parts.next()?.to_string(), parts.next()?.to_string()))
        })
        .collect();
    let (_, target) = mounted
        .iter()
        .find(|(src, _)| {
            Path::new(src.trim_start_matches("./")) == Path::new("examples/creditgate.toml")
        })
        .expect("examples/creditgate.toml mounted");
    let mut cmd = words(&cg["command"]);
    if cmd.is_empty() {
        cmd = dockerfile_cmd(&std::fs::read_to_string(&dockerfile).unwrap());
    }
    assert_eq!(cmd.first().map(String::as_str), Some("serve"), "{cmd:?}");
    assert_eq!(flag(&cmd, "--config").as_deref(), Some(target.as_str()));

    // The example configuration is valid with the environment compose gives it.
    let text = std::fs::read_to_string(root().join("examples/creditgate.toml")).unwrap();
    let config = Config::parse(&text, &env, 0).expect("example config with compose's env");
    assert_eq!(config.redis_url.as_deref(), Some(url.as_str()));
    if let Some(listen) = env.get("CREDITGATE_LISTEN") {
        assert_eq!(&config.listen.to_string(), listen);
        assert!(
            config.listen.ip().is_unspecified(),
            "listen on every interface inside the container"
        );
        let port = config.listen.port().to_string();
        let published = cg["ports"]
            .as_sequence()
            .map(|v| {
                v.iter()
                    .filter_map(|p| p.as_str())
                    .any(|p| p.ends_with(&format!(":{port}")))
            })
            .unwrap_or(false);
        assert!(published, "port {port} published");
    }
}

/// The Dockerfile's CMD in exec form.
fn dockerfile_cmd(text: &str) -> Vec<String> {
    let line = text
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with("CMD"))
        .expect("a CMD");
    serde_json::from_str(line.trim_start()[3..].trim()).expect("CMD in exec (JSON) form")
}

#[test]
fn the_dockerfile_builds_the_creditgate_binary_from_everything_the_build_reads() {
    let text = std::fs::read_to_string(root().join("Dockerfile")).expect("Dockerfile exists");
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    let build = lines
        .iter()
        .find(|l| l.starts_with("RUN") && l.contains("cargo build"))
        .expect("a RUN cargo build");
    assert!(build.contains("--release"), "{build}");
    assert!(build.contains("--bin creditgate"), "{build}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("COPY") && l.contains("target/release/creditgate")),
        "the final image takes the built binary"
    );
    let entry = lines
        .iter()
        .find(|l| l.starts_with("ENTRYPOINT"))
        .expect("ENTRYPOINT");
    assert!(entry.contains("creditgate"), "{entry}");

    // Every top-level path the build reads is copied in: the manifest, the
    // lock file, src, each declared target's directory, and every directory
    // an include_str!/include_bytes! reaches into.
    let copied: Vec<String> = lines
        .iter()
        .filter(|l| l.starts_with("COPY") && !l.contains("--from"))
        .flat_map(|l| {
            let parts: Vec<&str> = l.split_whitespace().skip(1).collect();
            parts[..parts.len().saturating_sub(1)]
                .iter()
                .map(|p| p.trim_end_matches('/').to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    let mut needed: Vec<String> = vec!["Cargo.toml".into(), "Cargo.lock".into(), "src".into()];
    let manifest: toml::Table = std::fs::read_to_string(root().join("Cargo.toml"))
        .unwrap()
        .parse()
        .unwrap();
    for kind in ["bin", "bench", "example", "test"] {
        for t in manifest
            .get(kind)
            .and_then(|v| v.as_array())
            .into_iter()
            .flatten()
        {
            if let Some(p) = t.get("path").and_then(|p| p.as_str()) {
                needed.push(p.split('/').next().unwrap().to_string());
            }
        }
    }
    for file in rust_files(&root().join("src")) {
        let src = std::fs::read_to_string(&file).unwrap();
        for part in src
            .split("include_str!(\"")
            .skip(1)
            .chain(src.split("include_bytes!(\"").skip(1))
        {
            let rel = part.split('"').next().unwrap();
            let target = file.parent().unwrap().join(rel);
            let target = target.canonicalize().unwrap_or(target);
            if let Ok(inside) = target.strip_prefix(root().canonicalize().unwrap()) {
                let top = inside.components().next().unwrap();
                needed.push(top.as_os_str().to_string_lossy().into_owned());
            }
        }
    }
    needed.sort();
    needed.dedup();
    for n in &needed {
        assert!(
            copied.iter().any(|c| c == n),
            "the Dockerfile must COPY {n} (copied: {copied:?})"
        );
    }
    assert!(needed.contains(&"src".to_string()));
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(rust_files(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out
}

#[test]
fn the_documented_nginx_configuration_is_the_tested_one() {
    let template = std::fs::read_to_string(root().join("tests/nginx/nginx.conf.template")).unwrap();
    let docs = std::fs::read_to_string(root().join("docs/gateways.md")).unwrap();
    assert!(
        docs.contains(&format!("```nginx\n{template}```")),
        "docs/gateways.md must quote tests/nginx/nginx.conf.template verbatim"
    );
}
