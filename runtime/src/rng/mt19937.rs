//! PyTorch's CPU engine: the 32-bit Mersenne Twister as `at::mt19937` seeds and steps it
//! (aten/src/ATen/core/MT19937RNGEngine.h), and the two ways `CPUGeneratorImpl` reads it
//! (aten/src/ATen/CPUGeneratorImpl.cpp: `random`, `random64`).

const N: usize = 624;
const M: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER_MASK: u32 = 0x8000_0000;
const LOWER_MASK: u32 = 0x7fff_ffff;

/// MT19937 with torch's seeding: `torch.Generator("cpu").manual_seed(seed)` builds
/// `mt19937(seed)`, whose state starts from `seed & 0xffffffff`. Only the seed's low 32 bits
/// matter (`2**32 + 5` draws what `5` does), as in torch.
#[derive(Clone)]
pub(crate) struct Mt19937 {
    state: [u32; N],
    /// Outputs left before the state is regenerated; 1 right after seeding, so the first draw
    /// twists first (torch's `left_`).
    left: usize,
    next: usize,
}

impl Mt19937 {
    /// `init_with_uint32`: Knuth's multiplier recurrence, in wrapping 32-bit arithmetic.
    pub(crate) fn new(seed: u64) -> Self {
        let mut state = [0u32; N];
        state[0] = seed as u32;
        for j in 1..N {
            let prev = state[j - 1];
            state[j] = 1_812_433_253u32.wrapping_mul(prev ^ (prev >> 30)).wrapping_add(j as u32);
        }
        Mt19937 { state, left: 1, next: 0 }
    }

    fn twist(u: u32, v: u32) -> u32 {
        let mixed = (u & UPPER_MASK) | (v & LOWER_MASK);
        (mixed >> 1) ^ if v & 1 == 1 { MATRIX_A } else { 0 }
    }

    /// `next_state`: regenerates all 624 words at once.
    fn next_state(&mut self) {
        let s = &mut self.state;
        for i in 0..N - M {
            s[i] = s[i + M] ^ Self::twist(s[i], s[i + 1]);
        }
        for i in N - M..N - 1 {
            s[i] = s[i + M - N] ^ Self::twist(s[i], s[i + 1]);
        }
        s[N - 1] = s[M - 1] ^ Self::twist(s[N - 1], s[0]);
        self.left = N;
        self.next = 0;
    }

    /// One tempered 32-bit output (`CPUGeneratorImpl::random`).
    pub(crate) fn next_u32(&mut self) -> u32 {
        self.left -= 1;
        if self.left == 0 {
            self.next_state();
        }
        let mut y = self.state[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }

    /// `CPUGeneratorImpl::random64`: two outputs, the first one the high half
    /// (`detail::make64BitsFrom32Bits(hi, lo)`).
    pub(crate) fn next_u64(&mut self) -> u64 {
        let hi = self.next_u32();
        let lo = self.next_u32();
        (u64::from(hi) << 32) | u64::from(lo)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_reference_mt19937() {
        // std::mt19937 (the same recurrence and seeding): the C++ standard requires its 10000th
        // output for the default seed 5489 to be 4123659995.
        let mut mt = Mt19937::new(5489);
        let last = (0..10_000).map(|_| mt.next_u32()).last();
        assert_eq!(last, Some(4_123_659_995));
    }

    #[test]
    fn only_the_low_32_bits_of_the_seed_count() {
        let draws = |seed| {
            let mut mt = Mt19937::new(seed);
            (0..8).map(|_| mt.next_u32()).collect::<Vec<_>>()
        };
        assert_eq!(draws(5), draws((1 << 32) + 5));
        assert_ne!(draws(5), draws(6));
    }
}
