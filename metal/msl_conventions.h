// The two macros our Metal sources use where plain C++ cannot spell a Metal
// construct the same way. Metal compiles them to the ordinary form below; the
// Linux emulator (tests/tools/metal_emulator/include/metal_stdlib) defines its own
// versions before this header is read. metal/README.md lists the MSL subset
// the kernels may use.
#pragma once

// A threadgroup array declared inside a kernel: `threadgroup T name[count]`.
// (In C++ a function-local array is per thread; the emulator hands every
// thread of the threadgroup the same storage instead.)
#ifndef FM_THREADGROUP_ARRAY
#define FM_THREADGROUP_ARRAY(type, name, count) threadgroup type name[count]
#endif

// Explicit instantiation of a kernel template under its host name. The
// emulator registers the function under the same name instead.
#ifndef FM_INSTANTIATE_KERNEL
#define FM_INSTANTIATE_KERNEL(host_name_string, ...) \
  template [[host_name(host_name_string)]] [[kernel]] decltype(__VA_ARGS__) __VA_ARGS__;
#endif
