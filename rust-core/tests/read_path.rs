// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The translation read path: the endpoint index.

use pvdma::domain::FaultReason;
use pvdma::{Vm, VmConfig};

#[test]
fn endpoints_are_indexed_by_every_requester_id() {
    let vm = Vm::new(VmConfig::default()).unwrap();
    // Corners of the bus/devfn index, several devfns on one bus.
    let rids = [
        0x0000, 0x00ff, 0x0100, 0x0108, 0x01ff, 0x8000, 0xff00, 0xffff,
    ];
    for &rid in rids.iter().rev() {
        vm.add_endpoint(rid, None).unwrap();
    }
    assert_eq!(vm.endpoints(), rids.to_vec());
    assert!(vm.add_endpoint(0x0108, None).is_err());
    assert!(vm.add_endpoint(0x1_0000, None).is_err());
    for &rid in &rids {
        assert_eq!(vm.endpoint(rid).unwrap().requester(), rid);
    }
    for rid in [0x0001, 0x0200, 0xfffe, 0x1_0000, 0x1_0108, u32::MAX] {
        assert!(vm.endpoint(rid).is_none(), "{rid:#x}");
        let f = vm.lookup(rid, 0x1000, None).unwrap_err();
        assert_eq!(f.reason, FaultReason::NoDevice);
    }
    // Emptying a bus and refilling it.
    vm.remove_endpoint(0x0100).unwrap();
    vm.remove_endpoint(0x0108).unwrap();
    vm.remove_endpoint(0x01ff).unwrap();
    assert!(vm.remove_endpoint(0x0108).is_err());
    assert_eq!(vm.endpoints(), vec![0x0000, 0x00ff, 0x8000, 0xff00, 0xffff]);
    vm.add_endpoint(0x0142, None).unwrap();
    assert_eq!(
        vm.endpoints(),
        vec![0x0000, 0x00ff, 0x0142, 0x8000, 0xff00, 0xffff]
    );
}
