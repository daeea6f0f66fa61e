//! The JSON body extractor (rejections in the `{message, code}` shape, 64 KiB
//! limit) and the lenient scalar types the Autumn SDKs need: they send every
//! number as a float (`1.0`, `1764000000000.0`).

use axum::body::Body;
use axum::extract::FromRequest;
use axum::http::{header, Request};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

use super::error::{ApiError, MAX_BODY_BYTES};

/// A JSON body. Malformed JSON, wrong types and missing fields answer 400
/// `invalid_inputs` naming the field; a body over 64 KiB answers 413.
/// Unknown fields are ignored.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request<Body>, _state: &S) -> Result<Self, ApiError> {
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
            return Err(ApiError::PayloadTooLarge);
        }
        let bytes = axum::body::to_bytes(req.into_body(), MAX_BODY_BYTES)
            .await
            .map_err(|e| {
                if is_length_limit(&e) {
                    ApiError::PayloadTooLarge
                } else {
                    ApiError::invalid("body", "could not be read")
                }
            })?;
        parse(&bytes).map(ApiJson)
    }
}

/// Whether reading the body failed because it passed the limit: the error
/// `http_body_util::Limited` raises, found by type in the source chain.
fn is_length_limit(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = s.source();
    }
    false
}

/// Parses a body, naming the field at fault.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        None => {
            return Err(ApiError::invalid(
                "body",
                "must be a JSON object, got nothing",
            ))
        }
        Some(b'{') => {}
        Some(_) => return Err(ApiError::invalid("body", "must be a JSON object")),
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let reason = strip_position(&inner.to_string());
        if inner.is_syntax() || inner.is_eof() {
            ApiError::invalid("body", format!("malformed JSON: {reason}"))
        } else if path == "." {
            ApiError::invalid("body", reason)
        } else {
            ApiError::invalid(&path, reason)
        }
    })?;
    Ok(value)
}

fn strip_position(msg: &str) -> String {
    match msg.find(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

fn integral(f: f64) -> Option<i64> {
    (f.is_finite() && f.fract() == 0.0 && f.abs() < 9.0e15).then_some(f as i64)
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Num {
    Int(i64),
    Float(f64),
    Str(String),
}

/// A millisecond timestamp: an integer, an integral float or a decimal string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Millis(pub i64);

impl<'de> Deserialize<'de> for Millis {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let n =
            Num::deserialize(d).map_err(|_| D::Error::custom("must be a millisecond timestamp"))?;
        let v = match n {
            Num::Int(i) => Some(i),
            Num::Float(f) => integral(f),
            Num::Str(s) => s.trim().parse::<f64>().ok().and_then(integral),
        };
        v.map(Millis)
            .ok_or_else(|| D::Error::custom("must be a whole number of milliseconds"))
    }
}

/// A whole count (`interval_count`, rollover `length`): integer or integral float.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Count(pub u32);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let n = Num::deserialize(d).map_err(|_| D::Error::custom("must be a whole number"))?;
        let v = match n {
            Num::Int(i) => Some(i),
            Num::Float(f) => integral(f),
            Num::Str(s) => s.trim().parse::<i64>().ok(),
        };
        v.and_then(|i| u32::try_from(i).ok())
            .map(Count)
            .ok_or_else(|| D::Error::custom("must be a whole number between 0 and 4294967295"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::Amount;

    #[derive(Deserialize, Debug)]
    #[allow(dead_code)]
    struct Body {
        customer_id: String,
        value: Option<Amount>,
        at: Option<Millis>,
        n: Option<Count>,
    }

    #[test]
    fn names_the_field_at_fault() {
        let e = parse::<Body>(br#"{"customer_id": 5}"#).unwrap_err();
        assert!(
            matches!(&e, ApiError::InvalidInputs(m) if m.starts_with("invalid customer_id:")),
            "{e:?}"
        );
        let e = parse::<Body>(br#"{}"#).unwrap_err();
        assert!(
            matches!(&e, ApiError::InvalidInputs(m) if m.contains("missing field `customer_id`")),
            "{e:?}"
        );
        let e = parse::<Body>(br#"{"customer_id": "a", "value": "1e3"}"#).unwrap_err();
        assert!(
            matches!(&e, ApiError::InvalidInputs(m) if m.starts_with("invalid value:")),
            "{e:?}"
        );
        let e = parse::<Body>(br#"{"customer_id": "a""#).unwrap_err();
        assert!(
            matches!(&e, ApiError::InvalidInputs(m) if m.contains("malformed JSON")),
            "{e:?}"
        );
        assert!(parse::<Body>(b"").is_err());
    }

    #[test]
    fn accepts_floats_for_counts_and_timestamps() {
        let b: Body =
            parse(br#"{"customer_id":"a","value":25.0,"at":1764000000000.0,"n":1.0,"x":1}"#)
                .unwrap();
        assert_eq!(b.value, Some(Amount::whole(25)));
        assert_eq!(b.at, Some(Millis(1_764_000_000_000)));
        assert_eq!(b.n, Some(Count(1)));
        assert!(parse::<Body>(br#"{"customer_id":"a","at":1.5}"#).is_err());
        assert!(parse::<Body>(br#"{"customer_id":"a","n":-1}"#).is_err());
    }
}

/// A nested JSON object, and only an object: serde's derived structs also
/// accept an array of their fields in order (`[null, null]`), which the
/// OpenAPI document (an `object`) does not allow.
#[derive(Debug)]
pub struct Obj<T>(pub T);

impl<'de, T: DeserializeOwned> Deserialize<'de> for Obj<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        if !v.is_object() {
            return Err(serde::de::Error::custom("must be a JSON object"));
        }
        serde_json::from_value(v)
            .map(Obj)
            .map_err(serde::de::Error::custom)
    }
}
