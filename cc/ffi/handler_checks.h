// What the CPU and CUDA handlers share: reading a call's buffers and checking them against
// their declarations (operands.h) and the context's layout, and the one place where the
// exceptions of the layers below become ffi::Error.
#pragma once

#include <cstddef>
#include <cstdint>
#include <exception>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "cc/a2a/errors.h"
#include "cc/base/layout.h"
#include "cc/ffi/ffi_types.h"
#include "cc/ffi/operands.h"

namespace jem {

inline int64_t Extent(const Layout& l, Dim dim) {
  switch (dim) {
    case Dim::kT: return l.max_tokens;
    case Dim::kH: return l.hidden;
    case Dim::kK: return l.experts_per_token;
    case Dim::kR: return l.num_ranks;
    case Dim::kL: return l.local_experts();
    case Dim::kM: return l.max_recv_tokens;
    case Dim::kN: return l.max_recv_records();
    case Dim::kS: return l.num_scales();
  }
  return -1;
}

// The dtype of the layout's elements of `bytes` bytes.
inline ffi::DataType ElementType(int32_t bytes) {
  switch (bytes) {
    case 1: return ffi::DataType::F8E4M3FN;
    case 2: return ffi::DataType::BF16;
    case 4: return ffi::DataType::F32;
    default: return ffi::DataType::INVALID;
  }
}

inline ffi::DataType ExpectedType(Dtype dtype, const Layout& l) {
  switch (dtype) {
    case Dtype::kI32: return ffi::DataType::S32;
    case Dtype::kF32: return ffi::DataType::F32;
    case Dtype::kDispatch: return ElementType(l.dispatch_elem_bytes);
    case Dtype::kCombine: return ElementType(l.combine_elem_bytes);
  }
  return ffi::DataType::INVALID;
}

// NumPy's name of the dtypes a caller is likely to pass.
inline std::string DtypeName(ffi::DataType dtype) {
  switch (dtype) {
    case ffi::DataType::S32: return "int32";
    case ffi::DataType::S64: return "int64";
    case ffi::DataType::F16: return "float16";
    case ffi::DataType::F32: return "float32";
    case ffi::DataType::F64: return "float64";
    case ffi::DataType::BF16: return "bfloat16";
    case ffi::DataType::F8E4M3FN: return "float8_e4m3fn";
    default: return "XLA dtype " + std::to_string(static_cast<int>(dtype));
  }
}

inline std::string DimsText(ffi::Span<const int64_t> dims) {
  std::string text = "[";
  for (size_t i = 0; i < dims.size(); ++i) text += (i ? ", " : "") + std::to_string(dims[i]);
  return text + "]";
}

// The data of `buffer` once its dtype and dims are those `operand` declares for this layout.
inline void* CheckedData(const char* target, const Operand& operand, const Layout& l,
                         const ffi::AnyBuffer& buffer) {
  const ffi::DataType want = ExpectedType(operand.dtype, l);
  if (buffer.element_type() != want) {
    throw InputError(std::string(target) + ": " + operand.name + " has dtype " +
                     DtypeName(buffer.element_type()) + ", expected " + DtypeName(want) + ".");
  }
  int64_t dims[2] = {};
  const ffi::Span<const int64_t> got = buffer.dimensions();
  bool same = got.size() == static_cast<size_t>(operand.rank);
  for (int i = 0; i < operand.rank; ++i) {
    dims[i] = Extent(l, operand.dims[i]);
    same = same && got[i] == dims[i];
  }
  if (!same) {
    throw InputError(std::string(target) + ": " + operand.name + " has shape " + DimsText(got) +
                     ", expected " + DimsText({dims, static_cast<size_t>(operand.rank)}) + ".");
  }
  return buffer.untyped_data();
}

// The buffer at `index` of a call's operands or results, or null if it is no buffer.
inline std::optional<ffi::AnyBuffer> BufferAt(const ffi::RemainingArgs& args, size_t index) {
  ffi::ErrorOr<ffi::AnyBuffer> buffer = args.get<ffi::AnyBuffer>(index);
  if (buffer.has_error()) return std::nullopt;
  return *buffer;
}
inline std::optional<ffi::AnyBuffer> BufferAt(const ffi::RemainingRets& rets, size_t index) {
  ffi::ErrorOr<ffi::Result<ffi::AnyBuffer>> buffer = rets.get<ffi::AnyBuffer>(index);
  if (buffer.has_error()) return std::nullopt;
  return **buffer;
}

// Reads a call's operands (RemainingArgs) or results (RemainingRets) group by group, checking
// their count and each buffer; throws InputError naming the target and the buffer.
template <typename Buffers>
class BufferReader {
 public:
  BufferReader(const char* target, const char* what, const Layout& layout, Buffers buffers)
      : target_(target), what_(what), layout_(layout), buffers_(buffers) {}

  template <typename... Groups>
  std::tuple<Groups...> Read(std::tuple<Groups...>*) {
    const size_t expected = (Count<Groups>() + ... + 0);
    if (buffers_.size() != expected) {
      throw InputError(std::string(target_) + " takes " + std::to_string(expected) + " " +
                       what_ + ", got " + std::to_string(buffers_.size()) + ".");
    }
    return {ReadGroup<Groups>()...};  // a braced list reads the groups in order
  }

 private:
  template <typename Group>
  static size_t Count() {
    size_t n = 0;
    Group{}.Fields([&n](auto&, const Operand&) { ++n; });
    return n;
  }

  template <typename Group>
  Group ReadGroup() {
    Group group{};
    group.Fields([this](auto& field, const Operand& operand) {
      using T = std::remove_pointer_t<std::remove_reference_t<decltype(field)>>;
      field = static_cast<T*>(Next(operand));
    });
    return group;
  }

  void* Next(const Operand& operand) {
    const std::optional<ffi::AnyBuffer> buffer = BufferAt(buffers_, next_++);
    if (!buffer) {
      throw InputError(std::string(target_) + ": " + operand.name + " is not a buffer.");
    }
    return CheckedData(target_, operand, layout_, *buffer);
  }

  const char* target_;
  const char* what_;
  const Layout& layout_;
  Buffers buffers_;
  size_t next_ = 0;
};

// The groups `Target` declares, its operands then its results, read from a call.
template <typename Target>
auto ReadGroups(const Layout& layout, ffi::RemainingArgs args, ffi::RemainingRets rets) {
  BufferReader<ffi::RemainingArgs> operands(Target::kName, "operands", layout, args);
  BufferReader<ffi::RemainingRets> results(Target::kName, "results", layout, rets);
  auto in = operands.Read(static_cast<typename Target::Args*>(nullptr));
  return std::tuple_cat(std::move(in), results.Read(static_cast<typename Target::Rets*>(nullptr)));
}

// Each misuse as one code on both platforms.
inline ffi::Error ToFfiError(const std::exception& e) {
  ffi::ErrorCode code = ffi::ErrorCode::kInternal;
  if (dynamic_cast<const InputError*>(&e) != nullptr) {
    code = ffi::ErrorCode::kInvalidArgument;
  } else if (dynamic_cast<const ContextNotFound*>(&e) != nullptr) {
    code = ffi::ErrorCode::kNotFound;
  } else if (dynamic_cast<const ContextUnusable*>(&e) != nullptr) {
    code = ffi::ErrorCode::kFailedPrecondition;
  }
  return ffi::Error(code, e.what());
}

// One call of `Target`: find() its context (a shared_ptr), read and check its buffers, and
// run(context, groups...). Whatever they throw is returned as an ffi::Error.
template <typename Target, typename Find, typename Run>
ffi::Error RunTarget(Find&& find, ffi::RemainingArgs args, ffi::RemainingRets rets, Run&& run) {
  try {
    const auto context = find();
    std::apply([&](const auto&... groups) { run(*context, groups...); },
               ReadGroups<Target>(context->layout(), args, rets));
    return ffi::Error::Success();
  } catch (const std::exception& e) {
    return ToFfiError(e);
  }
}

}  // namespace jem
