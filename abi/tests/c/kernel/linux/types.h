/* Stand-in for the Linux kernel's <linux/types.h> in the header test: the kernel defines these
 * fixed-width names (and size_t) for kernel code, which has no C library headers. */
#ifndef TEST_LINUX_TYPES_H
#define TEST_LINUX_TYPES_H
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef unsigned long long uint64_t;
typedef signed char int8_t;
typedef short int16_t;
typedef int int32_t;
typedef long long int64_t;
typedef unsigned long size_t;
typedef unsigned long uintptr_t;
#endif
