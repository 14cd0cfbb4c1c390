// .npy reading and writing: round trips and malformed files (errors name the file and the problem).
#include "base/npy.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace moe {
namespace {

class NpyTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("npy_test_" + std::to_string(getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string Path(const std::string& name) const { return (dir_ / name).string(); }

  // Writes a raw .npy (version 1.0) with the given header dict text and payload.
  std::string WriteRaw(const std::string& name, const std::string& dict, const std::string& payload,
                       int declared_len_extra = 0) {
    std::string header = dict;
    const size_t unpadded = 10 + header.size() + 1;
    header.append((64 - unpadded % 64) % 64, ' ');
    header.push_back('\n');
    const size_t len = header.size() + static_cast<size_t>(declared_len_extra);
    std::string out("\x93NUMPY\x01\x00", 8);
    out.push_back(static_cast<char>(len & 0xff));
    out.push_back(static_cast<char>((len >> 8) & 0xff));
    out += header;
    out += payload;
    return WriteBytes(name, out);
  }
  std::string WriteBytes(const std::string& name, const std::string& bytes) {
    const std::string p = Path(name);
    std::ofstream f(p, std::ios::binary);
    f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    return p;
  }
  static std::string Floats(int n) {
    std::vector<float> v(static_cast<size_t>(n));
    for (int i = 0; i < n; ++i) v[i] = 0.5f * static_cast<float>(i);
    return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float));
  }

  // Expects an error whose message names the file and contains `what`.
  static void ExpectError(const Status& s, const std::string& path, const std::string& what) {
    ASSERT_FALSE(s.ok());
    EXPECT_NE(s.message().find(path), std::string::npos) << s.message();
    EXPECT_NE(s.message().find(what), std::string::npos) << s.message();
  }

  std::filesystem::path dir_;
};

TEST_F(NpyTest, Float32RoundTrip2D) {
  Tensor t(3, 5);
  for (int64_t i = 0; i < t.size(); ++i) t[i] = static_cast<float>(i) * 0.25f - 1.0f;
  t[7] = -0.0f;
  t[8] = 1e-38f;
  ASSERT_TRUE(WriteNpy(Path("a.npy"), t).ok());
  StatusOr<NpyArray> arr = ReadNpy(Path("a.npy"));
  ASSERT_TRUE(arr.ok()) << arr.status().ToString();
  EXPECT_EQ(arr->dtype, NpyDtype::kFloat32);
  EXPECT_EQ(arr->shape, (std::vector<int64_t>{3, 5}));
  StatusOr<Tensor> back = ReadNpyFloat(Path("a.npy"));
  ASSERT_TRUE(back.ok());
  ASSERT_EQ(back->rows(), 3);
  ASSERT_EQ(back->cols(), 5);
  EXPECT_EQ(std::memcmp(back->data(), t.data(), sizeof(float) * 15), 0);
  StatusOr<Tensor> shaped = ReadNpyFloatShaped(Path("a.npy"), 3, 5);
  ASSERT_TRUE(shaped.ok()) << shaped.status().ToString();
  EXPECT_EQ(std::memcmp(shaped->data(), t.data(), sizeof(float) * 15), 0);
}

TEST_F(NpyTest, Float32RoundTrip1D) {
  Tensor t(1, 4);
  for (int64_t i = 0; i < 4; ++i) t[i] = 1.5f * static_cast<float>(i + 1);
  ASSERT_TRUE(WriteNpyVector(Path("v.npy"), t).ok());
  StatusOr<NpyArray> arr = ReadNpy(Path("v.npy"));
  ASSERT_TRUE(arr.ok());
  EXPECT_EQ(arr->shape, (std::vector<int64_t>{4}));
  StatusOr<Tensor> back = ReadNpyFloat(Path("v.npy"));
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(back->rows(), 1);
  EXPECT_EQ(back->cols(), 4);
  EXPECT_EQ(back->vec(), t.vec());
  StatusOr<Tensor> shaped = ReadNpyFloatShaped(Path("v.npy"), -1, 4);
  ASSERT_TRUE(shaped.ok()) << shaped.status().ToString();
  EXPECT_EQ(shaped->vec(), t.vec());
}

TEST_F(NpyTest, Int32RoundTrip1DAnd2D) {
  IntTensor t(2, 3);
  for (int64_t i = 0; i < 6; ++i) t[i] = static_cast<int32_t>(i * 1000003) - 7;
  t[5] = INT32_MIN;
  ASSERT_TRUE(WriteNpy(Path("i.npy"), t).ok());
  StatusOr<IntTensor> back = ReadNpyInt32(Path("i.npy"));
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(back->rows(), 2);
  EXPECT_EQ(back->cols(), 3);
  EXPECT_EQ(back->vec(), t.vec());

  const std::vector<int32_t> v = {-1, 0, 2147483647};
  ASSERT_TRUE(WriteNpy(Path("i1.npy"), NpyDtype::kInt32, {3}, v.data()).ok());
  StatusOr<NpyArray> arr = ReadNpy(Path("i1.npy"));
  ASSERT_TRUE(arr.ok());
  EXPECT_EQ(arr->dtype, NpyDtype::kInt32);
  EXPECT_EQ(arr->shape, (std::vector<int64_t>{3}));
  StatusOr<IntTensor> back1 = ReadNpyInt32(Path("i1.npy"));
  ASSERT_TRUE(back1.ok());
  EXPECT_EQ(back1->rows(), 1);
  EXPECT_EQ(back1->vec(), v);
}

TEST_F(NpyTest, Int64RoundTrip1DAnd2D) {
  const std::vector<int64_t> v = {INT64_MIN, -1, 0, 1, int64_t{1} << 40, INT64_MAX};
  for (const auto& shape : {std::vector<int64_t>{6}, std::vector<int64_t>{2, 3}}) {
    ASSERT_TRUE(WriteNpy(Path("l.npy"), NpyDtype::kInt64, shape, v.data()).ok());
    StatusOr<NpyArray> arr = ReadNpy(Path("l.npy"));
    ASSERT_TRUE(arr.ok()) << arr.status().ToString();
    EXPECT_EQ(arr->dtype, NpyDtype::kInt64);
    EXPECT_EQ(arr->shape, shape);
    EXPECT_EQ(arr->NumElements(), 6);
    ASSERT_EQ(arr->bytes.size(), v.size() * 8);
    EXPECT_EQ(std::memcmp(arr->bytes.data(), v.data(), arr->bytes.size()), 0);
  }
  // Reading int64 as float or int32 is refused with the file name.
  StatusOr<Tensor> f = ReadNpyFloat(Path("l.npy"));
  ExpectError(f.status(), Path("l.npy"), "float32");
  StatusOr<IntTensor> i = ReadNpyInt32(Path("l.npy"));
  ExpectError(i.status(), Path("l.npy"), "int32");
}

TEST_F(NpyTest, HeaderIsPaddedTo64Bytes) {
  Tensor t(2, 2, 1.0f);
  ASSERT_TRUE(WriteNpy(Path("p.npy"), t).ok());
  std::ifstream f(Path("p.npy"), std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  ASSERT_GE(bytes.size(), 10u);
  const size_t header_len = static_cast<uint8_t>(bytes[8]) | (static_cast<uint8_t>(bytes[9]) << 8);
  EXPECT_EQ((10 + header_len) % 64, 0u);
  EXPECT_EQ(bytes[10 + header_len - 1], '\n');
  EXPECT_EQ(bytes.size(), 10 + header_len + 16);
}

TEST_F(NpyTest, BadMagic) {
  Tensor t(2, 2, 1.0f);
  ASSERT_TRUE(WriteNpy(Path("m.npy"), t).ok());
  std::ifstream f(Path("m.npy"), std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  bytes[1] = 'X';
  const std::string p = WriteBytes("bad_magic.npy", bytes);
  ExpectError(ReadNpy(p).status(), p, "magic");
  const std::string empty = WriteBytes("empty.npy", "");
  ExpectError(ReadNpy(empty).status(), empty, "magic");
  const std::string tiny = WriteBytes("tiny.npy", "\x93NUM");
  ExpectError(ReadNpy(tiny).status(), tiny, "magic");
}

TEST_F(NpyTest, TruncatedData) {
  const std::string p =
      WriteRaw("trunc.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", Floats(5));
  ExpectError(ReadNpy(p).status(), p, "needs 24");
  ExpectError(ReadNpyFloat(p).status(), p, "data holds 20 bytes");
  // Too much data is refused as well.
  const std::string q =
      WriteRaw("long.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", Floats(7));
  ExpectError(ReadNpy(q).status(), q, "needs 24");
  // Sanity: the exact size loads.
  const std::string ok =
      WriteRaw("ok.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", Floats(6));
  StatusOr<Tensor> t = ReadNpyFloat(ok);
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  EXPECT_EQ((*t)(1, 2), 2.5f);
}

TEST_F(NpyTest, WrongDtype) {
  const std::string p =
      WriteRaw("f8.npy", "{'descr': '<f8', 'fortran_order': False, 'shape': (3,), }", Floats(6));
  ExpectError(ReadNpy(p).status(), p, "dtype '<f8' is not supported");
  const std::string q =
      WriteRaw("bigend.npy", "{'descr': '>f4', 'fortran_order': False, 'shape': (3,), }", Floats(3));
  ExpectError(ReadNpy(q).status(), q, "'>f4'");
}

TEST_F(NpyTest, FortranOrder) {
  const std::string p =
      WriteRaw("fo.npy", "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }", Floats(4));
  ExpectError(ReadNpy(p).status(), p, "fortran_order");
}

TEST_F(NpyTest, GarbageShape) {
  for (const std::string& shape : {std::string("(2, x)"), std::string("(-1,)"), std::string("garbage"),
                                   std::string("(2.5,)"), std::string("(99999999999999999999,)")}) {
    const std::string p = WriteRaw(
        "shape.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': " + shape + ", }", Floats(2));
    Status s = ReadNpy(p).status();
    ExpectError(s, p, "shape");
  }
  // No shape at all.
  const std::string p = WriteRaw("noshape.npy", "{'descr': '<f4', 'fortran_order': False, }", "");
  ExpectError(ReadNpy(p).status(), p, "'shape'");
  // A huge shape is refused before any allocation.
  const std::string h = WriteRaw(
      "huge.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (100000000, 100000000), }", "");
  ExpectError(ReadNpy(h).status(), h, "too large");
}

TEST_F(NpyTest, HeaderLengthPastEnd) {
  const std::string p = WriteRaw("hl.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }",
                                 "", /*declared_len_extra=*/1000);
  ExpectError(ReadNpy(p).status(), p, "header length exceeds the file size");
  // Version 2.0 with a 4-byte length that is past the end.
  std::string v2("\x93NUMPY\x02\x00\xff\xff\xff\x7f{}", 14);
  const std::string q = WriteBytes("hl2.npy", v2);
  ExpectError(ReadNpy(q).status(), q, "header length exceeds the file size");
  // Unknown version.
  std::string v9("\x93NUMPY\x09\x00\x02\x00{}", 12);
  const std::string r = WriteBytes("v9.npy", v9);
  ExpectError(ReadNpy(r).status(), r, "version 9");
}

TEST_F(NpyTest, MissingFileIsAnError) {
  Status s = ReadNpy(Path("does_not_exist.npy")).status();
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("does_not_exist.npy"), std::string::npos) << s.message();
}

TEST_F(NpyTest, ShapedMismatchMessage) {
  Tensor t(3, 4, 2.0f);
  ASSERT_TRUE(WriteNpy(Path("s.npy"), t).ok());
  Status s = ReadNpyFloatShaped(Path("s.npy"), 4, 3).status();
  ExpectError(s, Path("s.npy"), "shape (3, 4) does not match the expected (4, 3)");
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  Status v = ReadNpyFloatShaped(Path("s.npy"), -1, 12).status();
  ExpectError(v, Path("s.npy"), "shape (3, 4) does not match the expected (12,)");
  Tensor vec(1, 5, 1.0f);
  ASSERT_TRUE(WriteNpyVector(Path("vec.npy"), vec).ok());
  Status w = ReadNpyFloatShaped(Path("vec.npy"), 1, 5).status();
  ExpectError(w, Path("vec.npy"), "shape (5,) does not match the expected (1, 5)");
}

TEST_F(NpyTest, ParseNpyNeverCrashesOnPrefixes) {
  // Every prefix of a valid file is either refused with a message or (the whole file) accepted.
  Tensor t(2, 3, 1.0f);
  ASSERT_TRUE(WriteNpy(Path("full.npy"), t).ok());
  std::ifstream f(Path("full.npy"), std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  for (size_t n = 0; n < bytes.size(); ++n) {
    StatusOr<NpyArray> a =
        ParseNpy("mem.npy", reinterpret_cast<const uint8_t*>(bytes.data()), n);
    ASSERT_FALSE(a.ok()) << n;
    EXPECT_NE(a.status().message().find("mem.npy"), std::string::npos);
  }
  EXPECT_TRUE(ParseNpy("mem.npy", reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()).ok());
}

}  // namespace
}  // namespace moe
