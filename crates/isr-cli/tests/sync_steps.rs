//! A sync as three steps run separately through the library (plan, upload, commit): the upload is
//! idempotent (a second call sends nothing), nothing is committed before the commit, and the committed
//! version reads back as written.

mod common;
use common::*;
use isr_client::home::Home;
use isr_client::parcel::Client as Lib;
use isr_format::ImageKind;

fn library_client(c: &Client) -> Lib {
    let password = c.password.clone();
    Lib::new(
        Home::open(c.home.path()).unwrap(),
        c.user.clone(),
        Some(c.server.clone()),
        None,
        Box::new(move || Ok(password.clone())),
    )
}

#[test]
fn plan_upload_upload_again_commit() {
    let server = Server::start();
    let a = Client::new(&server, "alice");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vm.img");
    make_image(&img, 32 << 20);
    a.ok(&["create", "vm", "--disk", img.to_str().unwrap(), "--memory", "64"]);
    a.ok(&["checkout", "vm"]);

    // 1 MiB of new data at 8 MiB (zeros in version 1): several new chunks.
    let mut patch = vec![0u8; 1 << 20];
    blake3::Hasher::new().update(b"sync steps").finalize_xof().fill(&mut patch);
    let mut expected = std::fs::read(&img).unwrap();
    expected[8 << 20..9 << 20].copy_from_slice(&patch);

    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut lib = library_client(&a);
    rt.block_on(async {
        let o = lib.open("vm").unwrap();
        let disk = lib.working_image(&o, ImageKind::Disk, false).await.unwrap();
        disk.write(8 << 20, &patch).await.unwrap();
        disk.flush().await.unwrap();
        disk.close().await.unwrap();
    });

    let mut plan = rt.block_on(lib.plan_sync("vm")).unwrap();
    assert!(plan.is_modified());
    let new = plan.new_chunks().len();
    assert!(new >= 2, "1 MiB of new data makes several new chunks, the plan has {new}");
    assert_eq!(plan.missing_at_plan().map(<[_]>::len), Some(new), "the server lacks every new chunk");

    let first = rt.block_on(lib.upload_planned(&mut plan)).unwrap();
    assert_eq!(first.chunks, new as u64, "the first upload sends every new chunk");
    assert!(first.bytes > 0);
    let again = rt.block_on(lib.upload_planned(&mut plan)).unwrap();
    assert_eq!(again.chunks, 0, "a second upload sends nothing: the server has every chunk");
    assert_eq!(plan.uploaded().chunks, new as u64);
    // Uploaded, not committed: the head is still version 1 and the parcel still modified here.
    let st = a.stat("vm");
    assert_eq!(st["head_version"], 1, "{st}");
    assert_eq!(st["state"], "modified", "{st}");

    let (version, transfer) = rt.block_on(lib.commit_planned(plan, "three steps")).unwrap().unwrap();
    assert_eq!(version, 2);
    assert_eq!(transfer.chunks, new as u64, "the commit needed no chunk the uploads had not sent");
    let st = a.stat("vm");
    assert_eq!((st["head_version"].clone(), st["base_version"].clone()), (2.into(), 2.into()), "{st}");
    assert_eq!(st["state"], "unmodified", "{st}");

    // Another client of the same user reads version 2 back as written.
    let other = Client::new(&server, "alice");
    let out = dir.path().join("v2.img");
    other.ok(&["export", "vm", "--version", "2", "--output", out.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == expected, "version 2 differs from what was written");
    // A plan of the committed parcel has nothing left to do.
    let plan = rt.block_on(lib.plan_sync("vm")).unwrap();
    assert!(!plan.is_modified() && plan.new_chunks().is_empty());
    assert_eq!(rt.block_on(lib.commit_planned(plan, "nothing")).unwrap().map(|(v, _)| v), None);
}
