// flowtok-run: text-to-image from a `flowtok-fast export` package, without Python.
//
//   flowtok-run PKG IDS NOISE OUTDIR
//
// PKG     the package directory (text.pt2, flow.pt2, decode.pt2, runner.txt, manifest.json)
// IDS     one line of 77 CLIP token ids per prompt (`flowtok-fast tokenize --out IDS`; tokenising
//         in C++ is out of scope)
// NOISE   the text-VAE noise written by Python (`flowtok-fast tokenize --noise-out NOISE --seed S`):
//         a header line `flowtok-noise N 77 16`, then N*77*16 little-endian float32
// OUTDIR  receives 000.ppm, 001.ppm, ... (binary PPM, P6: no image library is linked)
//
// The same steps as PackagePipeline: batches of the package's size, the last one padded with
// empty prompts and zero noise, padding dropped; images -> uint8 as (clamp(0,1)*255).round().
// Exit codes: 0 done, 2 bad input (one line on stderr), 1 anything else.
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/torch.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace fs = std::filesystem;

namespace {

constexpr int kTokens = 77;
constexpr int kChannels = 16;
constexpr int64_t kVocab = 49408;
constexpr int64_t kStartOfText = 49406, kEndOfText = 49407;

struct BadInput : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Package {
  int64_t batch = 0, steps = 0, rows = 0, resolution = 0;
  std::string flow_mode, device;
  std::vector<double> times;
};

Package read_package(const fs::path& dir) {
  if (!fs::is_directory(dir)) throw BadInput("package " + dir.string() + ": not a directory");
  const fs::path facts = dir / "runner.txt";
  if (!fs::is_regular_file(dir / "manifest.json") || !fs::is_regular_file(facts))
    throw BadInput("package " + dir.string() + ": no manifest.json/runner.txt (not a complete `flowtok-fast export` package)");
  std::ifstream in(facts);
  std::map<std::string, std::string> kv;
  for (std::string line; std::getline(in, line);) {
    auto space = line.find(' ');
    if (space != std::string::npos) kv[line.substr(0, space)] = line.substr(space + 1);
  }
  for (const char* key : {"format", "batch", "steps", "flow_mode", "flow_rows", "resolution", "device", "flow_times"})
    if (!kv.count(key)) throw BadInput(facts.string() + ": no '" + key + "' line");
  if (kv["format"] != "1") throw BadInput(facts.string() + ": format " + kv["format"] + ", expected 1");
  Package p;
  p.batch = std::stoll(kv["batch"]);
  p.steps = std::stoll(kv["steps"]);
  p.rows = std::stoll(kv["flow_rows"]);
  p.resolution = std::stoll(kv["resolution"]);
  p.flow_mode = kv["flow_mode"];
  p.device = kv["device"];
  std::istringstream ts(kv["flow_times"]);
  for (double t; ts >> t;) p.times.push_back(t);
  if (static_cast<int64_t>(p.times.size()) != p.steps)
    throw BadInput(facts.string() + ": " + std::to_string(p.times.size()) + " flow times for " + kv["steps"] + " steps");
  for (const char* stage : {"text.pt2", "flow.pt2", "decode.pt2"})
    if (!fs::is_regular_file(dir / stage)) throw BadInput("package " + dir.string() + ": " + stage + " is missing");
  return p;
}

torch::Tensor read_ids(const fs::path& path) {
  std::ifstream in(path);
  if (!in) throw BadInput("ids file " + path.string() + ": cannot be read");
  std::vector<int64_t> ids;
  int lineno = 0;
  for (std::string line; std::getline(in, line);) {
    ++lineno;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;  // blank lines
    std::istringstream fields(line);
    std::string field;
    int count = 0;
    while (fields >> field) {
      size_t used = 0;
      int64_t id = -1;
      try { id = std::stoll(field, &used); } catch (const std::exception&) { used = 0; }
      if (used != field.size() || id < 0 || id >= kVocab)
        throw BadInput(path.string() + ":" + std::to_string(lineno) + ": '" + field +
                       "' is not a CLIP token id (an integer in 0.." + std::to_string(kVocab - 1) + ")");
      ids.push_back(id);
      ++count;
    }
    if (count != kTokens)
      throw BadInput(path.string() + ":" + std::to_string(lineno) + ": " + std::to_string(count) +
                     " ids, expected 77 (write the file with `flowtok-fast tokenize`)");
  }
  if (ids.empty()) throw BadInput("ids file " + path.string() + ": no prompts (expected lines of 77 integers)");
  const int64_t n = static_cast<int64_t>(ids.size()) / kTokens;
  return torch::tensor(ids, torch::kInt64).view({n, kTokens});
}

torch::Tensor read_noise(const fs::path& path, int64_t n) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw BadInput("noise file " + path.string() + ": cannot be read");
  std::string header;
  std::getline(in, header);
  std::istringstream h(header);
  std::string magic;
  int64_t count = -1, tokens = -1, channels = -1;
  h >> magic >> count >> tokens >> channels;
  if (magic != "flowtok-noise" || tokens != kTokens || channels != kChannels)
    throw BadInput("noise file " + path.string() + ": header '" + header.substr(0, 40) +
                   "', expected 'flowtok-noise N 77 16' (write it with `flowtok-fast tokenize --noise-out`)");
  if (count != n)
    throw BadInput("noise file " + path.string() + ": noise for " + std::to_string(count) + " prompt(s), the ids file has " +
                   std::to_string(n));
  auto noise = torch::empty({n, kTokens, kChannels}, torch::kFloat32);  // little-endian hosts (x86, arm64)
  const auto bytes = static_cast<std::streamsize>(noise.numel() * sizeof(float));
  in.read(reinterpret_cast<char*>(noise.data_ptr<float>()), bytes);
  if (in.gcount() != bytes || in.peek() != EOF)
    throw BadInput("noise file " + path.string() + ": expected exactly " + std::to_string(bytes) + " bytes after the header");
  return noise;
}

void write_ppm(const fs::path& path, const torch::Tensor& hwc) {  // uint8 [H, W, 3]
  const fs::path tmp = path.string() + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary);
    out << "P6\n" << hwc.size(1) << " " << hwc.size(0) << "\n255\n";
    out.write(reinterpret_cast<const char*>(hwc.data_ptr<uint8_t>()), static_cast<std::streamsize>(hwc.numel()));
    if (!out) throw std::runtime_error("cannot write " + tmp.string());
  }
  fs::rename(tmp, path);  // whole files only
}

int run(int argc, char** argv) {
  if (argc != 5) throw BadInput("usage: flowtok-run PKG IDS NOISE OUTDIR");
  const fs::path pkg = argv[1], out = argv[4];
  const Package p = read_package(pkg);
  const auto ids = read_ids(argv[2]);
  const auto noise = read_noise(argv[3], ids.size(0));
  fs::create_directories(out);
  const torch::Device device(p.device);

  c10::InferenceMode guard;
  torch::inductor::AOTIModelPackageLoader text((pkg / "text.pt2").string());
  torch::inductor::AOTIModelPackageLoader flow((pkg / "flow.pt2").string());
  torch::inductor::AOTIModelPackageLoader decode((pkg / "decode.pt2").string());
  std::vector<torch::Tensor> times;
  for (double t : p.times) times.push_back(torch::full({p.rows}, t, torch::dtype(torch::kFloat32).device(device)));

  const int64_t n = ids.size(0);
  for (int64_t start = 0; start < n; start += p.batch) {
    const int64_t real = std::min(p.batch, n - start);
    auto batch_ids = ids.slice(0, start, start + real);
    auto batch_noise = noise.slice(0, start, start + real);
    if (real < p.batch) {  // the empty prompt: start, end, zeros (as tokenize([""])), zero noise
      auto pad_ids = torch::zeros({p.batch - real, kTokens}, torch::kInt64);
      pad_ids.select(1, 0).fill_(kStartOfText);
      pad_ids.select(1, 1).fill_(kEndOfText);
      batch_ids = torch::cat({batch_ids, pad_ids});
      batch_noise = torch::cat({batch_noise, torch::zeros({p.batch - real, kTokens, kChannels})});
    }
    auto te = text.run({batch_ids.to(device), batch_noise.to(device)});
    torch::Tensor x = te.at(1);
    if (p.flow_mode == "step") {
      for (const auto& t : times) x = flow.run({x, t}).at(0);
    } else {
      x = flow.run({x}).at(0);
    }
    auto images = decode.run({x, te.at(0)}).at(0).slice(0, 0, real);
    auto pixels = images.clamp(0, 1).mul(255).round().to(torch::kUInt8).permute({0, 2, 3, 1}).contiguous().cpu();
    for (int64_t i = 0; i < real; ++i) {
      char name[32];
      std::snprintf(name, sizeof(name), "%03lld.ppm", static_cast<long long>(start + i));
      write_ppm(out / name, pixels[i]);
    }
  }
  std::cout << n << " image(s) -> " << out.string() << "\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const BadInput& e) {
    std::cerr << "flowtok-run: error: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::string message = e.what();
    std::cerr << "flowtok-run: error: " << message.substr(0, message.find('\n')) << "\n";
    return 1;
  }
}
