use chatvec::arith::{Operand, add_diff};
use chatvec::dtype::FloatType;
fn main() {
    let n = 64usize << 20;
    let a: Vec<u8> = (0..n * 2).map(|i| (i * 7 % 251) as u8 & 0x3f).collect();
    let mut out = vec![0u8; n * 2];
    let op = |x: &[u8]| Operand {
        ty: FloatType::BF16,
        bytes: unsafe { std::slice::from_raw_parts(x.as_ptr(), x.len()) },
    };
    for _ in 0..2 {
        let t = std::time::Instant::now();
        add_diff(FloatType::BF16, &mut out, op(&a), op(&a[..]), op(&a), 0.5);
        let s = t.elapsed().as_secs_f64();
        println!("add_diff bf16: {:.2} ns/elem, {:.2} G elem/s", s * 1e9 / n as f64, n as f64 / s / 1e9);
    }
}
