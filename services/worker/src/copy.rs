//! A minimal encoder for PostgreSQL's binary `COPY` format, for exactly the column types the usage rows need
//! (uuid, timestamptz, int4, text, inet). Binary COPY skips the server's text parsing, which is most of the cost of
//! loading rows.

use std::net::IpAddr;

use chrono::{DateTime, Utc};
use uuid::Uuid;

const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";
/// Microseconds from the Unix epoch to PostgreSQL's epoch (2000-01-01 UTC).
const POSTGRES_EPOCH_MICROS: i64 = 946_684_800_000_000;
/// Address families as PostgreSQL's inet send/receive functions number them (not the OS's AF_* values).
const PGSQL_AF_INET: u8 = 2;
const PGSQL_AF_INET6: u8 = 3;

/// A binary COPY stream being built: header, rows, then [`CopyEncoder::finish`] for the trailer.
pub struct CopyEncoder {
    buf: Vec<u8>,
    columns: u16,
    fields_in_row: u16,
}

impl CopyEncoder {
    /// An encoder for rows of `columns` fields, with room for about `capacity` bytes.
    pub fn new(columns: u16, capacity: usize) -> CopyEncoder {
        let mut buf = Vec::with_capacity(capacity + 32);
        buf.extend_from_slice(SIGNATURE);
        buf.extend_from_slice(&0i32.to_be_bytes()); // flags: no OIDs
        buf.extend_from_slice(&0i32.to_be_bytes()); // header extension length
        CopyEncoder { buf, columns, fields_in_row: columns }
    }

    /// Starts a row; exactly `columns` fields must follow.
    pub fn row(&mut self) {
        debug_assert_eq!(self.fields_in_row, self.columns, "the previous row has the wrong number of fields");
        self.buf.extend_from_slice(&(self.columns as i16).to_be_bytes());
        self.fields_in_row = 0;
    }

    fn field(&mut self, bytes: &[u8]) {
        // Fields are bounded by the codec (a few kB at most), far below i32::MAX.
        self.buf.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
        self.buf.extend_from_slice(bytes);
        self.fields_in_row += 1;
    }

    pub fn null(&mut self) {
        self.buf.extend_from_slice(&(-1i32).to_be_bytes());
        self.fields_in_row += 1;
    }

    pub fn uuid(&mut self, value: Uuid) {
        self.field(value.as_bytes());
    }

    pub fn timestamptz(&mut self, value: DateTime<Utc>) {
        self.field(&(value.timestamp_micros() - POSTGRES_EPOCH_MICROS).to_be_bytes());
    }

    pub fn int4(&mut self, value: i32) {
        self.field(&value.to_be_bytes());
    }

    pub fn int4_opt(&mut self, value: Option<i32>) {
        match value {
            Some(value) => self.int4(value),
            None => self.null(),
        }
    }

    pub fn text(&mut self, value: &str) {
        self.field(value.as_bytes());
    }

    pub fn text_opt(&mut self, value: Option<&str>) {
        match value {
            Some(value) => self.text(value),
            None => self.null(),
        }
    }

    /// An `inet` host address (full-length netmask).
    pub fn inet_opt(&mut self, value: Option<IpAddr>) {
        match value {
            Some(IpAddr::V4(v4)) => self.field(&[&[PGSQL_AF_INET, 32, 0, 4][..], &v4.octets()[..]].concat()),
            Some(IpAddr::V6(v6)) => self.field(&[&[PGSQL_AF_INET6, 128, 0, 16][..], &v6.octets()[..]].concat()),
            None => self.null(),
        }
    }

    /// The complete stream, with its trailer.
    pub fn finish(mut self) -> Vec<u8> {
        debug_assert_eq!(self.fields_in_row, self.columns, "the last row has the wrong number of fields");
        self.buf.extend_from_slice(&(-1i16).to_be_bytes());
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_rows_and_trailer_are_laid_out_as_postgres_expects() {
        let mut copy = CopyEncoder::new(3, 0);
        copy.row();
        copy.int4(7);
        copy.text("ab");
        copy.null();
        let bytes = copy.finish();
        let mut expected = b"PGCOPY\n\xff\r\n\0".to_vec();
        expected.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
        expected.extend_from_slice(&[0, 3]);
        expected.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 7]);
        expected.extend_from_slice(&[0, 0, 0, 2, b'a', b'b']);
        expected.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
        expected.extend_from_slice(&[0xff, 0xff]);
        assert_eq!(bytes, expected);
    }

    #[test]
    fn timestamps_count_microseconds_from_2000() {
        let mut copy = CopyEncoder::new(1, 0);
        copy.row();
        let millennium = DateTime::parse_from_rfc3339("2000-01-01T00:00:01.000002Z").expect("time").to_utc();
        copy.timestamptz(millennium);
        let bytes = copy.finish();
        assert_eq!(&bytes[21..25], &[0, 0, 0, 8]);
        assert_eq!(&bytes[25..33], &1_000_002i64.to_be_bytes());
    }

    #[test]
    fn inet_uses_postgres_family_numbers() {
        let mut copy = CopyEncoder::new(2, 0);
        copy.row();
        copy.inet_opt(Some("10.1.2.3".parse().expect("ip")));
        copy.inet_opt(Some("::1".parse().expect("ip")));
        let bytes = copy.finish();
        assert_eq!(&bytes[21..33], &[0, 0, 0, 8, 2, 32, 0, 4, 10, 1, 2, 3]);
        assert_eq!(&bytes[33..41], &[0, 0, 0, 20, 3, 128, 0, 16]);
    }
}
