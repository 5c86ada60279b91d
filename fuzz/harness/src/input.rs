//! Reading a fuzz input, and writing one (for seeds) in the same format.
//!
//! Every target reads its input through [`Input`], a thin layer over
//! [`arbitrary::Unstructured`]: integers are little-endian, a value read
//! past the end of the data is zero, and structures derived with
//! `#[derive(Arbitrary)]` read their fields in declaration order. [`Seed`]
//! writes the same encoding, so hand-made seeds say what they mean; the
//! crate's tests check that the two agree.

use arbitrary::{Arbitrary, Unstructured};

/// A fuzz input being read. Reads never fail: past the end, every value
/// is zero (a value cut short by the end is padded with zero bytes) and
/// every byte string empty.
pub struct Input<'a> {
    u: Unstructured<'a>,
}

impl<'a> Input<'a> {
    /// Reads `data` from the start.
    pub fn new(data: &'a [u8]) -> Self {
        Input {
            u: Unstructured::new(data),
        }
    }

    /// Any value `arbitrary` can build; the default when the data runs out
    /// before it is complete.
    pub fn read<T: Arbitrary<'a> + Default>(&mut self) -> T {
        T::arbitrary(&mut self.u).unwrap_or_default()
    }

    /// One byte.
    pub fn u8(&mut self) -> u8 {
        self.read()
    }

    /// A little-endian u16.
    pub fn u16(&mut self) -> u16 {
        self.read()
    }

    /// A little-endian u32.
    pub fn u32(&mut self) -> u32 {
        self.read()
    }

    /// A little-endian u64.
    pub fn u64(&mut self) -> u64 {
        self.read()
    }

    /// The next `n` bytes, or fewer at the end of the data.
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.u.len());
        self.u.bytes(n).unwrap_or_default()
    }

    /// A byte string preceded by its u16 length: the part of the input
    /// that a target treats as a sequence of operations.
    pub fn section(&mut self) -> Input<'a> {
        let len = usize::from(self.u16());
        Input::new(self.bytes(len))
    }

    /// Everything not read yet.
    pub fn rest(self) -> &'a [u8] {
        self.u.take_rest()
    }

    /// Whether everything has been read.
    pub fn is_empty(&self) -> bool {
        self.u.is_empty()
    }
}

/// A fuzz input being written, for seeds: the inverse of [`Input`].
#[derive(Clone, Debug, Default)]
pub struct Seed {
    bytes: Vec<u8>,
}

impl Seed {
    /// An empty input.
    pub fn new() -> Self {
        Seed::default()
    }

    /// Appends one byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.bytes.push(v);
        self
    }

    /// Appends a little-endian u16.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.raw(&v.to_le_bytes())
    }

    /// Appends a little-endian u32.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.raw(&v.to_le_bytes())
    }

    /// Appends a little-endian u64.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.raw(&v.to_le_bytes())
    }

    /// Appends bytes as they are.
    pub fn raw(&mut self, b: &[u8]) -> &mut Self {
        self.bytes.extend_from_slice(b);
        self
    }

    /// Appends `inner` as a section (see [`Input::section`]).
    pub fn section(&mut self, inner: &Seed) -> &mut Self {
        let len = u16::try_from(inner.bytes.len()).unwrap_or(u16::MAX);
        self.u16(len);
        let n = usize::from(len);
        self.raw(&inner.bytes[..n])
    }

    /// The bytes written.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The bytes written, by value.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Arbitrary, Debug, Default, PartialEq)]
    struct Pair {
        a: u16,
        b: u64,
    }

    #[test]
    fn input_reads_what_seed_writes() {
        let mut inner = Seed::new();
        inner.u8(9).u32(0xdead_beef);
        let mut s = Seed::new();
        s.u8(7)
            .u16(0x1234)
            .u32(0x5678_9abc)
            .u64(u64::MAX - 1)
            .u16(3)
            .u64(5)
            .section(&inner)
            .raw(b"tail");
        let mut i = Input::new(s.bytes());
        assert_eq!(i.u8(), 7);
        assert_eq!(i.u16(), 0x1234);
        assert_eq!(i.u32(), 0x5678_9abc);
        assert_eq!(i.u64(), u64::MAX - 1);
        assert_eq!(i.read::<Pair>(), Pair { a: 3, b: 5 });
        let mut sec = i.section();
        assert_eq!((sec.u8(), sec.u32()), (9, 0xdead_beef));
        assert!(sec.is_empty());
        assert_eq!(i.rest(), b"tail");
    }

    #[test]
    fn input_past_the_end_reads_zero() {
        let mut i = Input::new(&[1]);
        assert_eq!(i.u32(), 1, "a partial value is padded with zeroes");
        assert_eq!(i.u64(), 0);
        assert!(i.bytes(10).is_empty());
        assert!(i.section().is_empty());
    }
}
