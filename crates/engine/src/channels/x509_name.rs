//! The subject of an x509 certificate as the text `tls-authz` rules match: QEMU takes
//! it from GnuTLS, which prints the relative distinguished names in certificate order,
//! `TYPE=value` joined by `,` (multi-valued ones by `+`), with RFC 4514 escaping:
//! `C=GB,O=Example Org,CN=client.example`.
//!
//! A pure DER walk over the certificate: no allocation beyond the output, every length
//! checked against what is left.

/// The subject DN of a DER certificate, or `None` when the DER is malformed.
pub fn subject_dn(cert: &[u8]) -> Option<String> {
    let (tag, certificate, _) = tlv(cert)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, tbs, _) = tlv(certificate)?;
    if tag != SEQUENCE {
        return None;
    }
    let mut rest = tbs;
    // [0] EXPLICIT version, present for v2 and v3 certificates
    if rest.first() == Some(&0xa0) {
        rest = tlv(rest)?.2;
    }
    // serialNumber, signature, issuer, validity, then subject
    for _ in 0..4 {
        rest = tlv(rest)?.2;
    }
    let (tag, subject, _) = tlv(rest)?;
    if tag != SEQUENCE {
        return None;
    }
    format_name(subject)
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;

/// One TLV: (tag, contents, what follows). Single-byte tags; definite lengths only.
fn tlv(buf: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = buf.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let mut len = 0usize;
        for &b in &rest[..n] {
            len = (len << 8) | usize::from(b);
        }
        rest = &rest[n..];
        len
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// A Name (SEQUENCE OF RelativeDistinguishedName, contents only) as text.
fn format_name(mut rdns: &[u8]) -> Option<String> {
    let mut out = String::new();
    while !rdns.is_empty() {
        let (tag, rdn, rest) = tlv(rdns)?;
        if tag != SET {
            return None;
        }
        rdns = rest;
        if !out.is_empty() {
            out.push(',');
        }
        let mut attrs = rdn;
        let mut first = true;
        while !attrs.is_empty() {
            let (tag, atv, rest) = tlv(attrs)?;
            if tag != SEQUENCE {
                return None;
            }
            attrs = rest;
            if !first {
                out.push('+');
            }
            first = false;
            let (tag, oid, value) = tlv(atv)?;
            if tag != OID {
                return None;
            }
            let (vtag, text, _) = tlv(value)?;
            match attribute_name(oid) {
                Some(name) => out.push_str(name),
                None => out.push_str(&dotted_oid(oid)?),
            }
            out.push('=');
            match string_value(vtag, text) {
                Some(s) if attribute_name(oid).is_some() => escape_into(&s, &mut out),
                _ => {
                    // RFC 4514: an attribute without a string form is `#` + hex DER
                    out.push('#');
                    for b in &value[..value.len() - tlv(value)?.2.len()] {
                        out.push_str(&format!("{b:02x}"));
                    }
                }
            }
        }
    }
    Some(out)
}

/// The short names GnuTLS prints for the common attribute types.
fn attribute_name(oid: &[u8]) -> Option<&'static str> {
    Some(match oid {
        [0x55, 0x04, n] => match n {
            3 => "CN",
            4 => "SN",
            5 => "serialNumber",
            6 => "C",
            7 => "L",
            8 => "ST",
            9 => "STREET",
            10 => "O",
            11 => "OU",
            12 => "title",
            17 => "postalCode",
            42 => "GN",
            43 => "initials",
            44 => "generationQualifier",
            46 => "dnQualifier",
            65 => "pseudonym",
            _ => return None,
        },
        // 1.2.840.113549.1.9.1 emailAddress
        [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x01] => "EMAIL",
        // 0.9.2342.19200300.100.1.25 domainComponent, .1 userId
        [0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x19] => "DC",
        [0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x01] => "UID",
        _ => return None,
    })
}

fn dotted_oid(oid: &[u8]) -> Option<String> {
    let (&first, rest) = oid.split_first()?;
    let mut out = format!("{}.{}", first / 40, first % 40);
    let mut value: u64 = 0;
    for &b in rest {
        value = value.checked_mul(128)? | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            out.push_str(&format!(".{value}"));
            value = 0;
        }
    }
    Some(out)
}

/// The text of a directory string, for the string types certificates use.
fn string_value(tag: u8, bytes: &[u8]) -> Option<String> {
    match tag {
        // UTF8String, PrintableString, IA5String, TeletexString (taken as Latin-1 when
        // it is not ASCII), VisibleString, NumericString
        0x0c => String::from_utf8(bytes.to_vec()).ok(),
        0x13 | 0x16 | 0x1a | 0x12 => std::str::from_utf8(bytes).ok().map(String::from),
        0x14 => Some(bytes.iter().map(|&b| char::from(b)).collect()),
        // BMPString: UCS-2 big-endian
        0x1e if bytes.len().is_multiple_of(2) => {
            let units: Vec<u16> = bytes
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16(&units).ok()
        }
        // UniversalString: UCS-4 big-endian
        0x1c if bytes.len().is_multiple_of(4) => bytes
            .chunks_exact(4)
            .map(|c| char::from_u32(u32::from_be_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        _ => None,
    }
}

/// RFC 4514 escaping of an attribute value.
fn escape_into(value: &str, out: &mut String) {
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (c == '#' || c == ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        if c == '\0' {
            out.push_str("\\00");
        } else {
            out.push(c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn der(tag: u8, contents: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        if contents.len() < 0x80 {
            out.push(contents.len() as u8);
        } else {
            out.push(0x82);
            out.extend_from_slice(&(contents.len() as u16).to_be_bytes());
        }
        out.extend_from_slice(contents);
        out
    }

    fn atv(oid: &[u8], tag: u8, value: &[u8]) -> Vec<u8> {
        der(SEQUENCE, &[der(OID, oid), der(tag, value)].concat())
    }

    fn cert_with_subject(rdns: &[Vec<u8>]) -> Vec<u8> {
        let name = der(SEQUENCE, &rdns.concat());
        let tbs = [
            der(0xa0, &der(0x02, &[2])),
            der(0x02, &[0x01, 0x02]),
            der(SEQUENCE, &der(OID, &[0x2a, 0x86, 0x48])),
            der(SEQUENCE, &der(SET, &atv(&[0x55, 4, 3], 0x0c, b"issuer"))),
            der(
                SEQUENCE,
                &[der(0x17, b"250101000000Z"), der(0x17, b"350101000000Z")].concat(),
            ),
            name,
            der(SEQUENCE, &[0u8; 200]),
        ]
        .concat();
        der(SEQUENCE, &der(SEQUENCE, &tbs))
    }

    #[test]
    fn names_are_in_certificate_order_with_gnutls_short_names() {
        let cert = cert_with_subject(&[
            der(SET, &atv(&[0x55, 4, 6], 0x13, b"GB")),
            der(SET, &atv(&[0x55, 4, 10], 0x0c, b"vmigrate tests")),
            der(SET, &atv(&[0x55, 4, 3], 0x0c, b"migration-client")),
        ]);
        assert_eq!(
            subject_dn(&cert).as_deref(),
            Some("C=GB,O=vmigrate tests,CN=migration-client")
        );
    }

    #[test]
    fn special_characters_are_escaped_and_multi_valued_rdns_joined_by_plus() {
        let cert = cert_with_subject(&[
            der(
                SET,
                &[
                    atv(&[0x55, 4, 11], 0x0c, b"a,b"),
                    atv(&[0x55, 4, 3], 0x0c, b" lead+trail "),
                ]
                .concat(),
            ),
            der(SET, &atv(&[0x55, 4, 99], 0x0c, b"x")),
        ]);
        assert_eq!(
            subject_dn(&cert).as_deref(),
            Some("OU=a\\,b+CN=\\ lead\\+trail\\ ,2.5.4.99=#0c0178")
        );
    }

    #[test]
    fn lengths_past_the_end_and_wrong_tags_are_refused() {
        let good = cert_with_subject(&[der(SET, &atv(&[0x55, 4, 3], 0x0c, b"x"))]);
        for cut in 0..good.len() {
            assert_eq!(subject_dn(&good[..cut]), None, "cut at {cut}");
        }
        let mut wrong = good.clone();
        wrong[0] = SET;
        assert_eq!(subject_dn(&wrong), None);
        // a length field of 5 bytes
        assert_eq!(subject_dn(&[0x30, 0x85, 1, 0, 0, 0, 0]), None);
    }

    #[test]
    fn bmp_and_teletex_strings_are_decoded() {
        let cert = cert_with_subject(&[
            der(SET, &atv(&[0x55, 4, 3], 0x1e, &[0, b'h', 0, b'i'])),
            der(SET, &atv(&[0x55, 4, 7], 0x14, &[0xe9])),
        ]);
        assert_eq!(subject_dn(&cert).as_deref(), Some("CN=hi,L=\u{e9}"));
    }
}
