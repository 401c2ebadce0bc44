//! Wrapped keyroots: unwrapping with a password key, opening with a recovery key, rewrapping.
#![no_main]

use isr_format::{KeyWrapKey, Keyroot, RecoverySecretKey, WrappedKeyroot};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let w = WrappedKeyroot(data.to_vec());
    let key = KeyWrapKey([0x77; 32]);
    let _ = w.is_recovery();
    assert!(w.unwrap(&key).is_err(), "nothing the fuzzer writes is sealed under this key");
    assert!(w.rewrap(&key, &KeyWrapKey([1; 32])).is_err());
    assert!(w.open_with_recovery(&RecoverySecretKey([0x33; 32])).is_err());
    // A valid wrapping of a keyroot taken from the data still opens after the round trip.
    if data.len() >= 32 {
        let kr = Keyroot(data[..32].try_into().unwrap());
        assert_eq!(WrappedKeyroot::wrap(&kr, &key).unwrap(&key).unwrap(), kr);
    }
});
