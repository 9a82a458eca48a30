//! A notebook's callback request: query string, content type, an
//! `Authorization` header, the token in the path and the body, together.
//! Half the time the path carries a valid token for the id `p-1`, so the
//! parsing past authentication is reached too.
#![no_main]
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use runbridge::domain::{CallbackSigner, Completion, PromiseId};

#[derive(Arbitrary, Debug)]
struct Request<'a> {
    query: Option<&'a str>,
    content_type: &'a str,
    authorization: Option<&'a str>,
    path_token: Option<&'a str>,
    valid_token: bool,
    reject: bool,
    body: &'a [u8],
}

fuzz_target!(|r: Request<'_>| {
    let signer = CallbackSigner::new(vec![secrecy::SecretString::from(
        "fuzz-callback-secret-0123456789abcdef".to_string(),
    )])
    .unwrap();
    let id = PromiseId::parse("p-1").unwrap();
    let valid = signer.sign(&id, 1_764_460_000_123);
    let mut headers = http::HeaderMap::new();
    if let Ok(v) = http::HeaderValue::from_str(r.content_type) {
        headers.insert(http::header::CONTENT_TYPE, v);
    }
    if let Some(Ok(v)) = r.authorization.map(http::HeaderValue::from_str) {
        headers.insert(http::header::AUTHORIZATION, v);
    }
    let token = if r.valid_token {
        Some(valid.expose())
    } else {
        r.path_token
    };
    let completion = if r.reject {
        Completion::Reject
    } else {
        Completion::Resolve
    };
    if let Ok((opened, _, _)) =
        runbridge::sidecar::parse_callback(&signer, completion, &headers, token, r.query, r.body)
    {
        // Only `p-1`'s token exists: nothing else can ever be opened.
        assert_eq!(opened, id);
    }
});
