use super::*;

use proptest::prelude::*;

fn small() -> LogOptions {
    LogOptions {
        segment_bytes_max: 256,
        record_bytes_max: 4096,
        sync: true,
    }
}

fn payload(index: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (index as usize * 31 + i) as u8).collect()
}

fn append_range(log: &mut SegmentedLog, start: u64, end: u64, len: usize) {
    let payloads: Vec<Vec<u8>> = (start..end).map(|i| payload(i, len)).collect();
    log.append(start, payloads.iter().map(Vec::as_slice))
        .unwrap();
}

fn assert_contents(log: &SegmentedLog, start: u64, end: u64, len: usize) {
    assert_eq!(log.first_index(), start);
    assert_eq!(log.next_index(), end);
    for index in start..end {
        assert_eq!(
            log.get(index).unwrap(),
            Some(payload(index, len)),
            "index {index}"
        );
    }
    assert_eq!(log.get(end).unwrap(), None);
    if start > 0 {
        assert_eq!(log.get(start - 1).unwrap(), None);
    }
}

/// A log in a fresh directory with small segments, holding entries
/// `0..count` appended one at a time (so it spans many segments).
fn small_log_of(count: u64) -> (tempfile::TempDir, SegmentedLog) {
    let dir = tempfile::tempdir().unwrap();
    let mut log = SegmentedLog::open(dir.path(), small()).unwrap();
    for index in 0..count {
        append_range(&mut log, index, index + 1, 50);
    }
    (dir, log)
}

/// Closes `log` and opens its directory again.
fn reopen(log: SegmentedLog, dir: &Path, options: LogOptions) -> SegmentedLog {
    drop(log);
    SegmentedLog::open(dir, options).unwrap()
}

fn set_len(path: &Path, len: u64) {
    OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    files.sort();
    files
}

#[test]
fn append_read_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = SegmentedLog::open(dir.path(), LogOptions::default()).unwrap();
    assert_eq!(log.last_index(), None);
    append_range(&mut log, 0, 10, 20);
    append_range(&mut log, 10, 12, 0);
    log.sync().unwrap();
    assert_eq!(log.last_index(), Some(11));
    assert_eq!(log.range(3, 6).unwrap().len(), 3);
    assert_eq!(log.get(10).unwrap(), Some(Vec::new()));
    let log = reopen(log, dir.path(), LogOptions::default());
    assert_eq!(log.recovered_torn_bytes(), 0);
    assert_eq!(log.next_index(), 12);
    for index in 0..10 {
        assert_eq!(log.get(index).unwrap(), Some(payload(index, 20)));
    }
    assert_eq!(log.get(11).unwrap(), Some(Vec::new()));
}

#[test]
fn rejects_gaps_and_oversized_records() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = SegmentedLog::open(dir.path(), small()).unwrap();
    append_range(&mut log, 5, 8, 4);
    let error = log.append(9, [&b"x"[..]]).unwrap_err();
    assert!(matches!(
        error,
        LogError::OutOfOrder {
            expected: 8,
            got: 9
        }
    ));
    let big = vec![0u8; 5000];
    assert!(matches!(
        log.append(8, [big.as_slice()]),
        Err(LogError::RecordTooLarge { .. })
    ));
    // Nothing of a rejected append is written.
    assert_eq!(log.next_index(), 8);
}

#[test]
fn segments_roll_and_sealed_segments_are_read_through_the_map() {
    let (dir, log) = small_log_of(40);
    assert!(log.segment_count() > 5, "{} segments", log.segment_count());
    assert_contents(&log, 0, 40, 50);
    let log = reopen(log, dir.path(), small());
    assert_contents(&log, 0, 40, 50);
}

#[test]
fn truncate_inside_a_sealed_segment_and_at_a_boundary() {
    let (dir, mut log) = small_log_of(40);
    log.truncate_from(13).unwrap();
    assert_contents(&log, 0, 13, 50);
    // Appends after a truncation land in the segment that held index 12.
    append_range(&mut log, 13, 20, 50);
    assert_contents(&log, 0, 20, 50);
    // A segment boundary: the first index of some segment.
    let boundary = segment_files(dir.path())
        .iter()
        .filter_map(|p| p.file_stem()?.to_str()?.parse::<u64>().ok())
        .find(|&first| first > 0)
        .unwrap();
    log.truncate_from(boundary).unwrap();
    assert_contents(&log, 0, boundary, 50);
    append_range(&mut log, boundary, boundary + 3, 50);
    let log = reopen(log, dir.path(), small());
    assert_contents(&log, 0, boundary + 3, 50);
}

#[test]
fn purge_drops_whole_segments_and_survives_reopen() {
    let (dir, mut log) = small_log_of(40);
    let before = log.segment_count();
    log.purge_to(21).unwrap();
    assert!(log.segment_count() < before);
    assert_contents(&log, 22, 40, 50);
    let mut log = reopen(log, dir.path(), small());
    assert_contents(&log, 22, 40, 50);
    // Purging past the end (a snapshot newer than the log) empties it; the
    // log restarts after the snapshot.
    log.purge_to(100).unwrap();
    assert_eq!(log.segment_count(), 0);
    assert_eq!((log.first_index(), log.next_index()), (101, 101));
    append_range(&mut log, 101, 104, 50);
    let log = reopen(log, dir.path(), small());
    assert_contents(&log, 101, 104, 50);
}

#[test]
fn an_empty_log_starts_where_the_first_append_says() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = SegmentedLog::open(dir.path(), small()).unwrap();
    append_range(&mut log, 57, 60, 8);
    let log = reopen(log, dir.path(), small());
    assert_contents(&log, 57, 60, 8);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[test]
fn torn_tail_is_cut_at_every_byte_offset_of_the_last_record() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = SegmentedLog::open(dir.path(), LogOptions::default()).unwrap();
    append_range(&mut log, 0, 4, 30);
    log.sync().unwrap();
    // The last record was appended after the last fsync: it can be torn.
    append_range(&mut log, 4, 5, 30);
    drop(log);
    let segment = segment_files(dir.path()).pop().unwrap();
    let full = std::fs::metadata(&segment).unwrap().len();
    let last_record_start = full - RECORD_HEADER_BYTES - 30;
    for cut in last_record_start..full {
        let copy = tempfile::tempdir().unwrap();
        copy_dir(dir.path(), copy.path());
        let copied = copy.path().join(segment.file_name().unwrap());
        set_len(&copied, cut);
        let mut log = SegmentedLog::open(copy.path(), LogOptions::default())
            .unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
        assert_eq!(log.recovered_torn_bytes(), cut - last_record_start);
        assert_contents(&log, 0, 4, 30);
        // The log is writable again right where the torn record was.
        append_range(&mut log, 4, 6, 30);
        let log = reopen(log, copy.path(), LogOptions::default());
        assert_contents(&log, 0, 6, 30);
    }
}

fn flip_byte(path: &Path, offset: u64) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[offset as usize] ^= 0x40;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn a_bad_crc_on_the_last_record_is_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = SegmentedLog::open(dir.path(), LogOptions::default()).unwrap();
    append_range(&mut log, 0, 5, 30);
    drop(log);
    let segment = segment_files(dir.path()).pop().unwrap();
    let full = std::fs::metadata(&segment).unwrap().len();
    flip_byte(&segment, full - 1);
    let log = SegmentedLog::open(dir.path(), LogOptions::default()).unwrap();
    assert_contents(&log, 0, 4, 30);
}

#[test]
fn garbage_past_the_synced_mark_is_a_tail_even_before_valid_looking_records() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = SegmentedLog::open(dir.path(), LogOptions::default()).unwrap();
    append_range(&mut log, 0, 3, 30);
    log.sync().unwrap();
    append_range(&mut log, 3, 6, 30);
    drop(log);
    // Pages of an unsynced append reached the disk out of order: record 3
    // is garbage, records 4 and 5 look whole.
    let segment = segment_files(dir.path()).pop().unwrap();
    flip_byte(&segment, SEGMENT_HEADER_BYTES + 3 * 38 + 8 + 3);
    let log = SegmentedLog::open(dir.path(), LogOptions::default())
        .expect("nothing past the mark was acknowledged: it is a tail");
    assert_contents(&log, 0, 3, 30);
    assert_eq!(log.recovered_torn_bytes(), 3 * 38);
}

#[test]
fn a_bad_record_before_the_synced_mark_is_corruption_even_at_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = SegmentedLog::open(dir.path(), LogOptions::default()).unwrap();
    append_range(&mut log, 0, 5, 30);
    log.sync().unwrap();
    drop(log);
    // The last record was fsynced (acknowledged): damage to it is no tail.
    let segment = segment_files(dir.path()).pop().unwrap();
    let full = std::fs::metadata(&segment).unwrap().len();
    flip_byte(&segment, full - 1);
    assert!(matches!(
        SegmentedLog::open(dir.path(), LogOptions::default()),
        Err(LogError::Corrupt { .. })
    ));
}

#[test]
fn a_truncation_brings_the_synced_mark_down_before_new_appends() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = SegmentedLog::open(dir.path(), LogOptions::default()).unwrap();
    append_range(&mut log, 0, 5, 30);
    log.sync().unwrap();
    log.truncate_from(2).unwrap();
    append_range(&mut log, 2, 3, 30);
    drop(log);
    // The new record 2 (unsynced) is torn: below the old mark, above the new.
    let segment = segment_files(dir.path()).pop().unwrap();
    let full = std::fs::metadata(&segment).unwrap().len();
    set_len(&segment, full - 5);
    let log = SegmentedLog::open(dir.path(), LogOptions::default())
        .expect("the mark came down with the truncation");
    assert_contents(&log, 0, 2, 30);
}

#[test]
fn a_limited_range_stops_at_its_byte_budget_but_returns_at_least_one_entry() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = SegmentedLog::open(dir.path(), LogOptions::default()).unwrap();
    append_range(&mut log, 0, 10, 100);
    assert_eq!(
        log.range_limited(0, 10, 250).unwrap().len(),
        3,
        "stops once 250 is reached"
    );
    assert_eq!(log.range_limited(0, 10, 300).unwrap().len(), 3);
    assert_eq!(log.range_limited(0, 10, 301).unwrap().len(), 4);
    assert_eq!(log.range_limited(4, 10, 1).unwrap(), vec![payload(4, 100)]);
    assert_eq!(log.range_limited(0, 10, usize::MAX).unwrap().len(), 10);
    assert!(log.range_limited(10, 20, 1).unwrap().is_empty());
}

#[test]
fn a_zero_filled_tail_is_cut_not_read_as_records() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = SegmentedLog::open(dir.path(), LogOptions::default()).unwrap();
    append_range(&mut log, 0, 3, 30);
    drop(log);
    let segment = segment_files(dir.path()).pop().unwrap();
    let mut bytes = std::fs::read(&segment).unwrap();
    bytes.extend_from_slice(&[0u8; 64]);
    std::fs::write(&segment, bytes).unwrap();
    let log = SegmentedLog::open(dir.path(), LogOptions::default()).unwrap();
    assert_contents(&log, 0, 3, 30);
    assert_eq!(log.recovered_torn_bytes(), 64);
}

#[test]
fn an_oversized_length_in_the_middle_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = SegmentedLog::open(dir.path(), LogOptions::default()).unwrap();
    append_range(&mut log, 0, 5, 30);
    drop(log);
    let segment = segment_files(dir.path()).pop().unwrap();
    // The high byte of the second record's length.
    flip_byte(&segment, SEGMENT_HEADER_BYTES + 38 + 3);
    assert!(matches!(
        SegmentedLog::open(dir.path(), LogOptions::default()),
        Err(LogError::Corrupt { .. })
    ));
}

#[test]
fn corruption_in_the_middle_refuses_to_open() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = SegmentedLog::open(dir.path(), LogOptions::default()).unwrap();
    append_range(&mut log, 0, 5, 30);
    drop(log);
    let segment = segment_files(dir.path()).pop().unwrap();
    // A payload byte of the second record.
    flip_byte(&segment, SEGMENT_HEADER_BYTES + 38 + 8 + 3);
    let error = SegmentedLog::open(dir.path(), LogOptions::default()).unwrap_err();
    match error {
        LogError::Corrupt { offset, reason, .. } => {
            assert_eq!(offset, SEGMENT_HEADER_BYTES + 38);
            assert!(reason.contains("crc32"), "{reason}");
        }
        other => panic!("expected Corrupt, got {other}"),
    }
}

#[test]
fn corruption_in_a_sealed_segment_refuses_to_open_even_at_its_end() {
    let (dir, log) = small_log_of(20);
    drop(log);
    let first = segment_files(dir.path()).remove(0);
    let len = std::fs::metadata(&first).unwrap().len();
    flip_byte(&first, len - 1);
    assert!(matches!(
        SegmentedLog::open(dir.path(), small()),
        Err(LogError::Corrupt { .. })
    ));
    // A sealed segment cut short is not a torn tail either.
    let (dir, log) = small_log_of(20);
    drop(log);
    let first = segment_files(dir.path()).remove(0);
    let len = std::fs::metadata(&first).unwrap().len();
    set_len(&first, len - 3);
    assert!(matches!(
        SegmentedLog::open(dir.path(), small()),
        Err(LogError::Corrupt { .. })
    ));
}

#[test]
fn group_commit_calls_back_after_the_fsync() {
    let dir = tempfile::tempdir().unwrap();
    let log = GroupCommitLog::new(SegmentedLog::open(dir.path(), small()).unwrap()).unwrap();
    let (sender, receiver) = std::sync::mpsc::channel();
    for index in 0..200u64 {
        let sender = sender.clone();
        let data = payload(index, 40);
        log.append(
            index,
            [data.as_slice()],
            Box::new(move |result| {
                sender.send((index, result.is_ok())).unwrap();
            }),
        )
        .unwrap();
    }
    let mut seen = Vec::new();
    for _ in 0..200 {
        seen.push(
            receiver
                .recv_timeout(std::time::Duration::from_secs(30))
                .unwrap(),
        );
    }
    // Callbacks run in append order, all successful.
    assert_eq!(seen, (0..200).map(|i| (i, true)).collect::<Vec<_>>());
    log.with(|l| assert_contents(l, 0, 200, 40));
    log.close();
}

#[test]
fn dropping_the_last_handle_flushes_what_is_pending_and_stops_the_flusher() {
    let dir = tempfile::tempdir().unwrap();
    let log = GroupCommitLog::new(SegmentedLog::open(dir.path(), small()).unwrap()).unwrap();
    let shared = Arc::downgrade(&log.shared);
    let (sender, receiver) = std::sync::mpsc::channel();
    let clone = log.clone();
    log.append(
        0,
        [payload(0, 40).as_slice()],
        Box::new(move |result| sender.send(result.is_ok()).unwrap()),
    )
    .unwrap();
    drop(log);
    drop(clone);
    assert!(
        receiver
            .recv_timeout(std::time::Duration::from_secs(30))
            .unwrap(),
        "the append was flushed"
    );
    // The flusher held the last reference: once it returned, it is gone.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while shared.upgrade().is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "the flusher thread did not stop"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let reopened = SegmentedLog::open(dir.path(), small()).unwrap();
    assert_contents(&reopened, 0, 1, 40);
}

#[derive(Debug, Clone)]
enum Op {
    Append(Vec<usize>),
    Truncate(u64),
    Purge(u64),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => proptest::collection::vec(0usize..120, 1..6).prop_map(Op::Append),
        1 => (0u64..60).prop_map(Op::Truncate),
        1 => (0u64..60).prop_map(Op::Purge),
        1 => Just(Op::Reopen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The log behaves like a (first index, Vec of payloads) model through
    /// appends, truncations, purges and reopens.
    #[test]
    fn matches_an_in_memory_model(ops in proptest::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let mut log = SegmentedLog::open(dir.path(), small()).unwrap();
        let mut model_first = 0u64;
        let mut model: Vec<Vec<u8>> = Vec::new();
        for op in ops {
            match op {
                Op::Append(sizes) => {
                    let start = model_first + model.len() as u64;
                    let payloads: Vec<Vec<u8>> = sizes
                        .iter()
                        .enumerate()
                        .map(|(i, &len)| payload(start + i as u64, len))
                        .collect();
                    log.append(start, payloads.iter().map(Vec::as_slice)).unwrap();
                    model.extend(payloads);
                }
                Op::Truncate(index) => {
                    log.truncate_from(index).unwrap();
                    if index < model_first {
                        model.clear();
                        model_first = index;
                    } else {
                        model.truncate((index - model_first) as usize);
                    }
                }
                Op::Purge(index) => {
                    log.purge_to(index).unwrap();
                    if index + 1 > model_first {
                        let drop = ((index + 1 - model_first) as usize).min(model.len());
                        model.drain(..drop);
                        model_first = index + 1;
                    }
                }
                Op::Reopen => {
                    drop(log);
                    log = SegmentedLog::open(dir.path(), small()).unwrap();
                }
            }
            prop_assert_eq!(log.first_index(), model_first);
            prop_assert_eq!(log.next_index(), model_first + model.len() as u64);
            let end = log.next_index();
            let stored = log.range(model_first, end).unwrap();
            prop_assert_eq!(&stored, &model);
        }
    }
}
