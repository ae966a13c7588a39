"""Reviewed deviations of our FUSE server from pjdfstest, with the reason for each.

`tests/test_pjdfstest.py` runs pjdfstest (238 files, 8,798 subtests on Linux) as root inside a
`python -m vmm fuse-mount SHARE MNT -o cache=never` mount of an empty share, twice:

* **default** options: the safe policies of issue 11 are on, so the subtests that need what they
  refuse fail, and each such failure is listed here with its cause.  Only POLICY causes remain:
  every BUG found by the first runs is fixed and its entries are gone.
* **permissive** options (`PERMISSIVE_OPTIONS`: device nodes, set-id bits and xattrs as a local
  file system has them): no deviation at all is allowed.

Every entry names one test file, the cause and the exact subtest numbers (prove's range
notation); a cause says what our code does, what a local file system does, and which option
restores POSIX.

How the list was made (2026-12-01, Linux 6.18 host, FUSE 7.37 session, after issue 11's fixes):
the default run fails 1,891 subtests in 33 files, the permissive run none.  One more run of the
whole suite splits the default failures: with only `allow_mknod=true`, 133 subtests in 2 files
still fail: the 93 SETID entries below, and 40 of chown/00.t's DEVICES entries, the set-id steps
on block and character devices, which fail under either policy (in the default run the missing
node makes them fail first, so they are listed under DEVICES).  Every other DEVICES entry passes
with device nodes allowed, and no SETID entry fails without the set-id policy.

Fixed since the first list (2026-12-01, before issue 11): 12 subtests in 4 files (chmod/12,
open/02, open/03, rename/21) failed because the server process's umask (022) was applied on top
of the caller's; creations now run with the request's umask in a thread-private fs_struct
(devices/virtio/fs/creds.py).  Also fixed, found by hand through the same mount: RENAME_WHITEOUT
made a 0:0 character device whatever the device-node policy (now EPERM unless allow_mknod, and
then owned by the caller); MKNOD passed rdev=0 (now decoded from new_encode_dev, mknod/11 checks
major,minor in the permissive run); xattrs of symlinks, FIFOs, sockets and devices answered
ENOTSUP (now what the host says: ENODATA, or EPERM for user.* writes).  Set-gid inheritance
is the host kernel's own now (a creation runs as the caller's fs uid/gid); the guest VFS (6.1,
like the 6.18 host) strips S_ISGID from a non-member's file before sending the request, and the
server keeps what it is sent (tests/test_passthrough_policy.py).

What pjdfstest cannot show: it runs as root through a kernel that enforces `default_permissions`,
so permission checks the host kernel makes before sending a request (sticky directories, rename
and unlink permission, chown rules, O_NOATIME) pass whatever the server does with its own root
credentials; the passthrough deliberately leaves those checks to the guest kernel (creds.py).
The 6.18 host kernel may send FUSE_STATX (opcode 52, FUSE 7.39) although the session is 7.37;
the server answers ENOSYS (the kernel stops asking).

When a policy changes, run `python tests/pjdfstest_support.py run -o cache=never` (and the same
with the permissive options) and update this list from its report.
"""

from __future__ import annotations

from dataclasses import dataclass

POLICY = "policy"   # deliberate: the safe default refuses it (issue 11); an option restores POSIX
BUG = "bug"         # our semantics differ from a local file system; to be fixed


@dataclass(frozen=True)
class Cause:
    key: str
    kind: str          # POLICY or BUG
    summary: str
    root_cause: str    # which request, what we do, what a local file system does
    fix: str


DEVICES = Cause(
    key="devices",
    kind=POLICY,
    summary="MKNOD of character and block devices is refused (EPERM) by the passthrough",
    root_cause=(
        "MKNOD with S_IFCHR/S_IFBLK: PassthroughFs.mknod raises EPERM 'device nodes are not "
        "allowed in the share' before any syscall (issue 11: a guest must not create device "
        "nodes on the host).  A local file system, to root with CAP_MKNOD, creates the node.  "
        "pjdfstest runs each check on every file type, so the refused `mknod N b|c 0644 1 2` "
        "is one failure and every later step of that block fails with it: chmod/chown/link/"
        "rename/stat/unlink of the missing name give ENOENT, and steps that expect EEXIST "
        "because the device holds the name succeed instead (link/10, mkdir/10, mkfifo/09, "
        "open/22, symlink/08: 'expected EEXIST, got 0'; the following unlink of the "
        "directory/socket made there then fails with EISDIR/EADDRINUSE)."),
    fix=(
        "Keep EPERM as the default and add `allow_mknod: true` (issue 11, item 2) which calls "
        "mknodat with the device number.  Note for that option: today mknod passes rdev=0 to "
        "os.mknod; fuse_mknod_in.rdev is the kernel's new_encode_dev() form, so decode it "
        "(major = (rdev >> 8) & 0xfff, minor = (rdev & 0xff) | ((rdev >> 12) & 0xfff00)) "
        "and pass os.makedev(major, minor); pjdfstest's mknod/11 checks major,minor.  A "
        "pjdfstest run with allow_mknod=true must then show no deviation from this cause."),
)

SETID = Cause(
    key="setid",
    kind=POLICY,
    summary="set-uid/set-gid bits on files are stripped (allow_setid: false)",
    root_cause=(
        "SETATTR(mode), CREATE, MKNOD: devices/virtio/fs/policy.permitted_mode strips S_ISUID, "
        "and S_ISGID of non-directories, before the host call (issue 11: a guest must not leave "
        "a set-uid file on the host); the reply reports the mode the host has.  A local file "
        "system keeps them: `chmod N 06555` after a chown reads back 06555 (chown/00 checks "
        "that chown clears them and a later chmod sets them again, for every file type and "
        "both chown and lchown), `chmod N 02755` as a group member reads back 02755 (chmod/00 "
        "113).  Directory S_ISGID is kept by the policy (group inheritance only)."),
    fix=(
        "Deliberate.  `allow_setid: true` keeps the bits; the permissive run shows no "
        "deviation then."),
)

CAUSES = {c.key: c for c in (DEVICES, SETID)}

#: fuse-mount options that switch every POLICY cause off: device nodes, set-id bits and every
#: xattr name as a local file system has them.  test_pjdfstest's permissive run uses them and
#: allows no deviation at all (only BUG entries could remain, and there are none).
PERMISSIVE_OPTIONS: tuple[str, ...] | None = (
    "allow_mknod=true", "allow_setid=true", "xattr_policy=passthrough")


@dataclass(frozen=True)
class Deviation:
    file: str          # relative to pjdfstest's tests/, e.g. "chmod/12.t"
    cause: Cause
    what: str          # what the failing subtests check, and how the cause shows there
    subtests: str      # prove's notation: "3-4, 7-8, 11-12"


EXPECTED: tuple[Deviation, ...] = (
    Deviation("chmod/00.t", DEVICES,
              "chmod/stat of block and char nodes",
              "32-34, 36-38, 41-44, 46-48, 51, 74-81, 98-105"),
    Deviation("chmod/01.t", DEVICES,
              "ENOTDIR with a device node as a path component",
              "8-13"),
    Deviation("chmod/00.t", SETID,
              "chmod 02755 by a member of the file's group keeps S_ISGID (POSIX)",
              "113"),
    Deviation("chmod/11.t", DEVICES,
              "sticky bit set on device nodes by root and by the owner",
              "26-28, 30-31, 33-36, 38-39, 41, 79-81, 83-86, 88-91, 93-96, 98"),
    Deviation("chown/00.t", DEVICES,
              "chown/lchown of device nodes, set-id clearing on them",
              "50-54, 56-58, 61-70, 72-74, 77-81, 192-198, 200-202, 204-206, 208-210, 213-228, "
              "230-232, 234-236, 238-240, 243-251, 329-331, 333-334, 337-344, 346-347, 350-354, "
              "483-492, 494-506, 508-529, 531-543, 545-556, 747-760, 762-780, 782-811, 813-831, "
              "833-848, 972-978, 980-985, 987-1002, 1004-1009, 1011-1019, 1097-1098, 1100, 1102, "
              "1104, 1106-1108, 1110-1113, 1115, 1117, 1119, 1121-1123, 1125-1126, 1210-1215, "
              "1217-1221, 1223-1236, 1238-1242, 1244-1251"),
    Deviation("chown/00.t", SETID,
              "chmod 06555 after a chown, and whether chown/lchown clear the bits again, for "
              "every file type and several users",
              "375, 379, 385-386, 391-392, 401, 405, 412, 414, 416, 418, 422-423, 425-426, "
              "428-429, 431-432, 438, 440, 442, 444, 449, 453, 459-460, 465-466, 475, 479, 560, "
              "564, 570-571, 576-577, 586, 590, 597, 601, 605, 611-612, 617-618, 623-624, 633, "
              "637, 641, 648, 652, 656, 658, 662-663, 668-669, 674-675, 677-678, 684, 688, 692, "
              "694, 699, 703, 707, 713-714, 719-720, 725-726, 735, 739, 743, 852, 856, 860, "
              "866-867, 872-873, 878-879, 888, 892, 896"),
    Deviation("chown/01.t", DEVICES,
              "ENOTDIR with a device node as a path component",
              "10-17"),
    Deviation("chown/07.t", DEVICES,
              "EPERM for a non-owner chown of device nodes",
              "64-69, 71-74, 76-89, 91-94, 96-103"),
    Deviation("link/00.t", DEVICES,
              "hard links of device nodes: nlink, ctime, ownership",
              "54-68, 70-72, 74, 76, 80-94, 96-98, 100, 102, 146-159, 181-184, 187-191, 194"),
    Deviation("link/01.t", DEVICES,
              "ENOTDIR with a device node as a path component",
              "14-25"),
    Deviation("link/10.t", DEVICES,
              "EEXIST when the destination is a device node (it is missing: link succeeds)",
              "11-12, 14-15"),
    Deviation("mkdir/01.t", DEVICES,
              "ENOTDIR with a device node as a path component",
              "8-13"),
    Deviation("mkdir/10.t", DEVICES,
              "EEXIST when the name is a device node (mkdir succeeds, later steps cascade)",
              "10-13, 15-16, 18-19, 21"),
    Deviation("mkfifo/01.t", DEVICES,
              "ENOTDIR with a device node as a path component",
              "8-13"),
    Deviation("mkfifo/09.t", DEVICES,
              "EEXIST when the name is a device node",
              "10-11, 13-14"),
    Deviation("mknod/01.t", DEVICES,
              "ENOTDIR with a device node as a path component",
              "12-21"),
    Deviation("mknod/02.t", DEVICES,
              "ENAMETOOLONG checks made with mknod b/c (the valid-length mknod fails)",
              "5-7, 9-11"),
    Deviation("mknod/03.t", DEVICES,
              "ENAMETOOLONG checks made with mknod b/c (the valid-length mknod fails)",
              "5-7, 9-11"),
    Deviation("mknod/08.t", DEVICES,
              "EEXIST when the name is a device node",
              "16-19, 21-24"),
    Deviation("mknod/11.t", DEVICES,
              "creating device nodes: modes, owner, major/minor",
              "2-6, 8-19, 21-27"),
    Deviation("open/01.t", DEVICES,
              "ENOTDIR with a device node as a path component",
              "10-17"),
    Deviation("open/22.t", DEVICES,
              "EEXIST with O_CREAT|O_EXCL when the name is a device node",
              "10-11, 13-14"),
    Deviation("rename/00.t", DEVICES,
              "rename of device nodes: link counts, ctime",
              "32-35, 37-42, 44-50, 52-57, 59-61, 106-113"),
    Deviation("rename/09.t", DEVICES,
              "sticky 'from' directory, for device-node sources, as several users",
              "32-33, 40-41, 90-91, 98-99, 148-149, 156-157, 206-207, 214-215, 264-265, 272-273, "
              "314-315, 318-321, 324-325, 356-357, 360-363, 366-367, 406-407, 414-415, 464-465, "
              "472-473, 522-523, 530-531, 580-581, 588-589, 638-639, 646-647, 688-689, 692-695, "
              "698-699, 730-731, 734-737, 740-741, 756-758, 760-761, 766, 768, 770, 776, 778, "
              "780-781, 784, 786, 788-789, 792, 794, 800, 802, 808, 810, 814-816, 818-819, 824, "
              "826, 828, 834, 836, 838-839, 842, 844, 846-847, 850, 852, 858, 860, 866, 868, "
              "872-874, 876-877, 882, 884, 886, 892, 894, 896-897, 900, 902, 904-905, 908, 910, "
              "916, 918, 924, 926, 930-932, 934-935, 940, 942, 944, 950, 952, 954-955, 958, 960, "
              "962-963, 966, 968, 974, 976, 982, 984, 988-990, 992-993, 998, 1000, 1002, 1008, "
              "1010, 1012-1013, 1016, 1018, 1020-1021, 1024, 1026, 1032, 1034, 1040, 1042, "
              "1046-1049, 1052-1053, 1058-1059, 1062-1073, 1076-1077, 1082-1083, 1086, 1088-1091, "
              "1094-1095, 1100-1101, 1104-1115, 1118-1119, 1124-1125, 1128, 1130-1132, 1134-1135, "
              "1140, 1142, 1144, 1150, 1152, 1154-1155, 1158, 1160, 1162-1163, 1166, 1168, 1174, "
              "1176, 1182, 1184, 1188-1190, 1192-1193, 1198, 1200, 1202, 1208, 1210, 1212-1213, "
              "1216, 1218, 1220-1221, 1224, 1226, 1232, 1234, 1240, 1242, 1246-1248, 1250-1251, "
              "1256, 1258, 1260, 1266, 1268, 1270-1271, 1274, 1276, 1278-1279, 1282, 1284, 1290, "
              "1292, 1298, 1300, 1304-1306, 1308-1309, 1314, 1316, 1318, 1324, 1326, 1328-1329, "
              "1332, 1334, 1336-1337, 1340, 1342, 1348, 1350, 1356, 1358, 1362-1364, 1366-1367, "
              "1372, 1374, 1376, 1382, 1384, 1386-1387, 1390, 1392, 1394-1395, 1398, 1400, 1406, "
              "1408, 1414, 1416, 1420-1423, 1426-1427, 1432-1433, 1436-1447, 1450-1451, 1456-1457, "
              "1460, 1462-1465, 1468-1469, 1474-1475, 1478-1489, 1492-1493, 1498-1499, 1502, "
              "1528-1529, 1536-1537, 1586-1587, 1594-1595, 1644-1645, 1652-1653, 1702-1703, "
              "1710-1711, 1760-1761, 1768-1769, 1810-1811, 1814-1817, 1820-1821, 1852-1853, "
              "1856-1859, 1862-1863, 1902-1903, 1910-1911, 1960-1961, 1968-1969, 2018-2019, "
              "2026-2027, 2076-2077, 2084-2085, 2134-2135, 2142-2143, 2184-2185, 2188-2191, "
              "2194-2195, 2226-2227, 2230-2233, 2236-2237"),
    Deviation("rename/10.t", DEVICES,
              "sticky 'to' directory, for device-node targets, as several users",
              "25-26, 33-34, 77-78, 85-86, 129-130, 137-138, 181-182, 189-190, 233-234, 241-242, "
              "281-285, 287-292, 295-296, 301-302, 305, 321-325, 327-332, 335-336, 341-342, 345, "
              "365-366, 373-374, 417-418, 425-426, 469-470, 477-478, 521-522, 529-530, 573-574, "
              "581-582, 621-625, 627-632, 635-636, 641-642, 645, 661-665, 667-672, 675-676, "
              "681-682, 685, 687-688, 691, 693, 695, 701, 703, 705-706, 709, 711, 713-714, 717, "
              "719, 725, 727, 733, 735, 739-740, 743, 745, 747, 753, 755, 757-758, 761, 763, "
              "765-766, 769, 771, 777, 779, 785, 787, 791-792, 795, 797, 799, 805, 807, 809-810, "
              "813, 815, 817-818, 821, 823, 829, 831, 837, 839, 843-844, 847, 849, 851, 857, 859, "
              "861-862, 865, 867, 869-870, 873, 875, 881, 883, 889, 891, 895-896, 899, 901, 903, "
              "909, 911, 913-914, 917, 919, 921-922, 925, 927, 933, 935, 941, 943, 947-948, 951, "
              "957, 961-963, 965-969, 971-972, 975, 981, 985, 987-988, 991, 997, 1001-1003, "
              "1005-1009, 1011-1012, 1015, 1021, 1025, 1027-1028, 1031, 1033, 1035, 1041, 1043, "
              "1045-1046, 1049, 1051, 1053-1054, 1057, 1059, 1065, 1067, 1073, 1075, 1079-1080, "
              "1083, 1085, 1087, 1093, 1095, 1097-1098, 1101, 1103, 1105-1106, 1109, 1111, 1117, "
              "1119, 1125, 1127, 1131-1132, 1135, 1137, 1139, 1145, 1147, 1149-1150, 1153, 1155, "
              "1157-1158, 1161, 1163, 1169, 1171, 1177, 1179, 1183-1184, 1187, 1189, 1191, 1197, "
              "1199, 1201-1202, 1205, 1207, 1209-1210, 1213, 1215, 1221, 1223, 1229, 1231, "
              "1235-1236, 1239, 1241, 1243, 1249, 1251, 1253-1254, 1257, 1259, 1261-1262, 1265, "
              "1267, 1273, 1275, 1281, 1283, 1287-1288, 1291, 1297, 1301-1303, 1305-1309, "
              "1311-1312, 1315, 1321, 1325, 1327-1328, 1331, 1337, 1341-1343, 1345-1349, "
              "1351-1352, 1355, 1361, 1365, 1385-1386, 1393-1394, 1437-1438, 1445-1446, 1489-1490, "
              "1497-1498, 1541-1542, 1549-1550, 1593-1594, 1601-1602, 1641-1645, 1647-1652, "
              "1655-1656, 1661-1662, 1665, 1681-1685, 1687-1692, 1695-1696, 1701-1702, 1705, "
              "1725-1726, 1733-1734, 1777-1778, 1785-1786, 1829-1830, 1837-1838, 1881-1882, "
              "1889-1890, 1933-1934, 1941-1942, 1981-1985, 1987-1992, 1995-1996, 2001-2002, 2005, "
              "2021-2025, 2027-2032, 2035-2036, 2041-2042, 2045"),
    Deviation("rename/12.t", DEVICES,
              "ENOTDIR with a device node as a path component",
              "14-25"),
    Deviation("rename/13.t", DEVICES,
              "ENOTDIR when 'to' is a device node",
              "12-32"),
    Deviation("rename/14.t", DEVICES,
              "EISDIR when 'from' is a device node",
              "12-13, 15-18, 20-21"),
    Deviation("rename/20.t", DEVICES,
              "ENOTEMPTY when the non-empty target holds a device node",
              "12-17, 19, 22, 25"),
    Deviation("rename/23.t", DEVICES,
              "rename over a multiply linked device node",
              "18-33"),
    Deviation("rmdir/06.t", DEVICES,
              "ENOTEMPTY when the directory holds a device node",
              "11-23"),
    Deviation("symlink/08.t", DEVICES,
              "EEXIST when name2 is a device node",
              "10-11, 13-14"),
    Deviation("unlink/00.t", DEVICES,
              "unlink of device nodes: nlink, ctime",
              "14-16, 18-20, 36-45, 59-66, 84-87, 90-93"),
    Deviation("unlink/11.t", DEVICES,
              "sticky directory, device nodes owned by others",
              "94-97, 100-103, 106-109, 112-115, 118-121, 124-129, 131-136, 138-141, 144-147, "
              "150-153, 156-159, 162-165, 168-173, 175-180"),
    Deviation("utimensat/00.t", DEVICES,
              "utimensat on device nodes",
              "17-26"),
)
